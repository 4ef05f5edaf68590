"""Run several dsclip trainings one after another in the same ranks (a test helper).

Launched like ``dsclip/train.py`` (deepspeed launcher, torchrun or plain python) with one
argument, a JSON spec ``{"runs": [{"name": N, "argv": [...], "env": {...}}, ...]}``.  Each run
calls ``dsclip.train.main(argv)`` in this process, with ``env`` set for its duration and the
process's stdout/stderr (file descriptors 1 and 2, so C++ and subprocess output too) going to
``<spec dir>/<name>.rank<R>.log``.  Exit codes land in ``<spec dir>/results.rank<R>.json``
after every run.  A run that raises ends the job at once (``os._exit``): a peer rank may be
waiting for it in a collective, and the launcher then tears the job down.

Interpreter, torch, DeepSpeed and open_clip start-up is most of a tiny test run's time; paying
it once for a batch of runs keeps the multi-rank tests inside the CI budget.  Every run is
still a complete, real training job on real ranks.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@contextlib.contextmanager
def redirected(path: str):
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def environment(extra: dict[str, str]):
    before = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(spec_path: str) -> int:
    with open(spec_path) as fh:
        spec = json.load(fh)
    out_dir = os.path.dirname(os.path.abspath(spec_path))
    rank = os.environ.get("RANK", "0")
    from dsclip.train import main as train_main

    results: dict[str, int] = {}
    for run in spec["runs"]:
        name = run["name"]
        with redirected(os.path.join(out_dir, f"{name}.rank{rank}.log")), environment(run.get("env", {})):
            try:
                rc = train_main(list(run["argv"]))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: BLE001 - reported in the run's log, then the job ends
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(1)
        results[name] = rc
        tmp = os.path.join(out_dir, f"results.rank{rank}.json.tmp")
        with open(tmp, "w") as fh:
            json.dump(results, fh)
        os.replace(tmp, tmp[: -len(".tmp")])
        gc.collect()
    return 0


if __name__ == "__main__":
    # the deepspeed launcher adds --local_rank=N (LOCAL_RANK is in the environment as well)
    sys.exit(main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))))
