"""Real rank processes for tests, forked from a server that has the heavy modules loaded.

An interpreter that imports torch, DeepSpeed, open_clip and dsclip spends ~10 s of CPU before
any work; a test suite of a hundred tiny multi-rank jobs on 2 cores would spend most of its time
there.  ``multiprocessing``'s forkserver imports them once; every rank is then a fresh process
forked from it, with its own PID, memory and process group, exactly as a launcher's would be,
minus the start-up.  The launchers themselves (``deepspeed``, ``torchrun``, PyTorchJob, SLURM)
have their own tests in tests/test_launch.py, tests/test_core_dist.py and tests/test_readme.py.

``train_job(args, nproc)`` runs ``dsclip.train.main(args)`` on ``nproc`` ranks with the
environment a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT) and behaves like one: when a rank fails, the others get a few seconds and are then
killed; the job's exit code is the first failing rank's; stdout+stderr of every rank, rank 0
first, come back as one ``.stdout``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

PRELOAD = [
    "torch", "deepspeed", "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.muon.muon_optimizer", "open_clip",
    "torch.utils.tensorboard", "safetensors.torch", "s3fs", "webdataset", "dsclip.train", "dsclip.engine",
    "dsclip.model", "dsclip.pretrained", "dsclip.strategies", "dsclip.loss", "dsclip.schedule", "dsclip.metrics",
    "dsclip.evaluate", "dsclip.guards", "dsclip.checkpoint", "dsclip.export", "dsclip.plan", "dsclip.accumulate",
    "dsclip.watchdog", "dsclip.reshard", "dsclip.wiseft", "dsclip.data", "dsclip.data.wds", "dsclip.data.csv",
    "dsclip.data.synthetic", "tests.launch",
]
_context: Any = None
FAIL_GRACE_S = 5.0  # what a launcher gives the other ranks once one has failed


def context():
    """The forkserver context (started on first use, once per test session)."""
    global _context
    if _context is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def apply_env(env: dict[str, str]) -> None:
    """Make a forked rank's environment ``env``, as a launcher's exec would.  What was read from
    the environment at import time in the server is read again: huggingface_hub's constants
    (cache dir, offline mode), and glibc's ``MALLOC_MMAP_THRESHOLD_``, applied by hand."""
    os.environ.clear()
    os.environ.update(env)
    if "huggingface_hub.constants" in sys.modules:
        import importlib

        importlib.reload(sys.modules["huggingface_hub.constants"])
    if "MALLOC_MMAP_THRESHOLD_" in env:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(env["MALLOC_MMAP_THRESHOLD_"]))  # M_MMAP_THRESHOLD


def _train_rank(rank: int, world: int, port: int, args: list[str], env: dict[str, str], log_path: str) -> None:
    apply_env(env)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from dsclip.train import main

    code = main(list(args))
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def train_job(args: list[str], nproc: int = 2, env: dict[str, str] | None = None,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one dsclip training job on ``nproc`` forked ranks (see the module docstring)."""
    from tests.launch import cpu_env, free_port

    env = dict(env or cpu_env())
    port = free_port()
    ctx = context()
    logs = tempfile.mkdtemp(prefix="dsclip-ranks-")
    paths = [os.path.join(logs, f"rank{r}.log") for r in range(nproc)]
    procs = [ctx.Process(target=_train_rank, args=(r, nproc, port, args, env, paths[r])) for r in range(nproc)]
    for p in procs:
        p.start()
    deadline, failed_at = time.monotonic() + timeout, None
    code = 0
    try:
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed and failed_at is None:
                failed_at, code = now, failed[0]
            if now > deadline or (failed_at is not None and now - failed_at > FAIL_GRACE_S):
                break
            time.sleep(0.05)
        timed_out = time.monotonic() > deadline and any(p.is_alive() for p in procs)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join()
    if not code:
        code = next((p.exitcode for p in procs if p.exitcode), 0)
    out = ""
    for path in paths:
        if os.path.exists(path):
            with open(path, errors="replace") as fh:
                out += fh.read()
    if timed_out:
        raise AssertionError(f"dsclip job still running after {timeout:.0f}s; killed its ranks. Output so far:\n"
                             f"{out[-4000:]}")
    proc = subprocess.CompletedProcess(["dsclip.train", *args], code, out, None)
    proc.port = port  # the rendezvous port, which names the job's shared-memory buffers
    return proc
