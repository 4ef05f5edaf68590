"""Run a function on N real gloo ranks (separate processes) for tests.

Each rank gets a ``torch.distributed`` process group built from a file store in a temp dir,
so tests need no free port.  A hang is bounded by ``timeout``: the parent kills the ranks and
fails the test rather than waiting forever.  Ranks are forked from tests/ranks.py's server, which
has the heavy modules loaded already.
"""

from __future__ import annotations

import glob
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tests.launch import free_port


def _worker(rank: int, world: int, store_path: str, out_dir: str, fn: Callable, args: tuple, port: int,
            env: dict[str, str]) -> None:
    from tests.ranks import apply_env

    apply_env(env)  # the test's environment now, not the fork server's from when it started
    torch.set_num_threads(1)
    # DeepSpeed's CPU shm comm op names its /dev/shm buffers after these; see run_ranks
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world, *args)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(("ok", result), fh)
    except BaseException:  # report the traceback to the parent
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
            pickle.dump(("error", traceback.format_exc()), fh)
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return each rank's result."""
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        from tests.ranks import context

        ctx = context()  # forked from a server with torch, DeepSpeed and open_clip loaded
        port = free_port()
        env = dict(os.environ)
        procs = [ctx.Process(target=_worker, args=(r, world, store_path, tmp, fn, args, port, env))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join()
        # ranks that initialise DeepSpeed themselves skip dsclip's unlinking of its shm buffers
        for leftover in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"):
            os.unlink(leftover)
        if hung:
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died with exit code {procs[r].exitcode}")
            with open(path, "rb") as fh:
                status, value = pickle.load(fh)
            if status != "ok":
                raise RuntimeError(f"rank {r} failed:\n{value}")
            results.append(value)
        return results
