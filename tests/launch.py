"""Launch real multi-rank dsclip training jobs from tests.

``launch_train(args, nproc=2, launcher="torchrun")`` runs ``dsclip/train.py`` through the real
``torchrun`` or ``deepspeed`` launcher on CPU ranks (gloo), on a free loopback port, with a hang
timeout, and returns the completed process (stdout+stderr in ``.stdout``).  torchrun is the
default: the deepspeed launcher adds two interpreters (runner and per-node launcher), ~5 s a
job on 2 cores; the tests that are about it ask for it.

``launch_many({name: args, ...})`` runs several trainings one after another: forked (the
default), each as its own job; with a real launcher, in one job (``tests/multirun.py``), so that
start-up is paid once.

Every job runs in its own process group; on a timeout the whole group (launcher *and* ranks)
is killed, so a hung test cannot leave ranks behind that starve the tests after it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "dsclip", "train.py")
MULTIRUN = os.path.join(ROOT, "tests", "multirun.py")
TINY = os.path.join(ROOT, "tests", "assets", "tiny-clip.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


def launcher_cmd(launcher: str, nproc: int, port: int, script: str = TRAIN) -> list[str]:
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), script]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), script]
    if launcher == "python":
        return [sys.executable, script]
    raise ValueError(launcher)


def tiny_args(run_dir_parent: str, name: str, *extra: str, steps_samples: int = 64) -> list[str]:
    """Flags for a tiny synthetic run that takes a few seconds."""
    return ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", str(steps_samples),
            "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--warmup", "2", "--wd", "0.1",
            "--precision", "fp32", "--logs-dir", run_dir_parent, "--name", name, "--log-every-n-steps", "2",
            "--workers", "0", "--threads", "1", *extra]


def run_process(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session, stdout+stderr merged as text; on a timeout every
    process of the session is killed and the test fails with the output so far."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    proc = subprocess.Popen(cmd, text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:6])} ... still running after {timeout:.0f}s; killed its process "
                             f"group. Output so far:\n{(out or '')[-4000:]}") from None
    finally:
        kill_group(proc)  # ranks a finished launcher left behind
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def launch_train(args: list[str], nproc: int = 2, launcher: str = "forked", timeout: float = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One training job; ``launcher`` "forked" (the default: ranks forked from a preloaded server,
    see tests/ranks.py), or a real "torchrun", "deepspeed" or "python" command line."""
    if launcher == "forked":
        from tests.ranks import train_job

        return train_job(list(args), nproc, env, timeout)
    cmd = launcher_cmd(launcher, nproc, free_port()) + list(args)
    return run_process(cmd, timeout, cwd=ROOT, env=env or cpu_env())


def _forked_many(runs, nproc: int, timeout: float, env: dict[str, str] | None):
    from tests.ranks import train_job

    results, code, job = {}, 0, None
    for name, run in runs.items():
        args, extra = (run if isinstance(run, tuple) else (run, {}))
        job = train_job(list(args), nproc, {**(env or cpu_env()), **extra}, timeout)
        results[name] = RunResult(job.returncode, job.stdout)
        code = code or job.returncode
    job.returncode = code
    return results, job


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


@dataclass
class RunResult:
    """One run of a ``launch_many`` job: its exit code (the job's, if the run never finished,
    e.g. a run that SIGKILLs itself) and every rank's output, rank 0 first."""

    returncode: int
    stdout: str


def launch_many(runs: dict[str, list[str] | tuple[list[str], dict[str, str]]], nproc: int = 2,
                launcher: str = "forked", timeout: float = 600, env: dict[str, str] | None = None,
                ) -> tuple[dict[str, RunResult], subprocess.CompletedProcess]:
    """Run ``runs`` (name -> args, or name -> (args, extra env for that run)) in order: with a real
    launcher, one after another in one job (tests/multirun.py); forked, each as its own job.
    The second value is the job (forked: the last one, with the first failure's exit code)."""
    if launcher == "forked":
        return _forked_many(runs, nproc, timeout, env)
    spec_dir = tempfile.mkdtemp(prefix="dsclip-multirun-")
    spec = {"runs": [{"name": name, "argv": list(r[0] if isinstance(r, tuple) else r),
                      "env": dict(r[1]) if isinstance(r, tuple) else {}} for name, r in runs.items()]}
    spec_path = os.path.join(spec_dir, "spec.json")
    with open(spec_path, "w") as fh:
        json.dump(spec, fh)
    port = free_port()
    job = run_process(launcher_cmd(launcher, nproc, port, MULTIRUN) + [spec_path], timeout, cwd=ROOT,
                      env=env or cpu_env())
    job.port = port  # the rendezvous port, which names the job's shared-memory buffers
    per_rank = [_read_json(os.path.join(spec_dir, f"results.rank{rank}.json")) for rank in range(nproc)]
    results = {}
    for name in runs:
        logs = []
        for rank in range(nproc):
            path = os.path.join(spec_dir, f"{name}.rank{rank}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    logs.append(fh.read())
        codes = [done.get(name) for done in per_rank]
        finished = all(c is not None for c in codes)
        rc = next((c for c in codes if c), 0) if finished else (job.returncode or 1)
        results[name] = RunResult(rc, "".join(logs) + ("" if finished else "\n[job output]\n" + job.stdout))
    return results, job
