"""Fault injection for tests, driven by environment variables so that real processes crash,
hang or record what they consumed at exact, repeatable points:

  DSCLIP_FAULT=kill_at_step:N        SIGKILL after optimizer step N
  DSCLIP_FAULT=hang_at_step:N        sleep forever after step N (a rank that stops responding)
  DSCLIP_FAULT=kill_in_save:P:N      SIGKILL at point P of the checkpoint save of step N; P is
                                     before_optimizer_states (inside DeepSpeed's save, model
                                     states written), after_engine_save or before_latest
  DSCLIP_FAULT_RANKS=0,1             limit the fault to these global ranks (default: all)
  DSCLIP_TRACE_KEYS=DIR              each rank appends the sample keys of every micro batch
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from typing import Any


def _targeted() -> bool:
    ranks = os.environ.get("DSCLIP_FAULT_RANKS")
    return ranks is None or os.environ.get("RANK", "0") in ranks.split(",")


def save_fault(point: str, step: int) -> None:
    if os.environ.get("DSCLIP_FAULT") == f"kill_in_save:{point}:{step}" and _targeted():
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def save_fault_inside(obj: Any, method: str, point: str, step: int) -> Iterator[None]:
    """``kill_in_save:POINT:N`` at the moment ``obj.method`` would run, during the save of step N:
    a crash inside a library's save, between the files it writes."""
    if os.environ.get("DSCLIP_FAULT") != f"kill_in_save:{point}:{step}" or not _targeted():
        yield
        return

    def killed(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    setattr(obj, method, killed)  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        delattr(obj, method)


def after_step_fault(step: int) -> None:
    """``DSCLIP_FAULT=kill_at_step:N`` SIGKILLs ranks (``DSCLIP_FAULT_RANKS``, default all) after
    step N: a real, deterministic crash for resume tests; ``hang_at_step:N`` makes them hang."""
    fault = os.environ.get("DSCLIP_FAULT", "")
    if not fault or not _targeted():
        return
    if fault == f"kill_at_step:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == f"hang_at_step:{step}":  # a rank that stops responding
        while True:
            time.sleep(3600)


def trace_keys(rank: int, epoch: int, batch: dict, index: int) -> None:
    """``DSCLIP_TRACE_KEYS=DIR``: each rank appends ``epoch batch keys`` per micro batch."""
    out = os.environ.get("DSCLIP_TRACE_KEYS")
    if out:
        with open(os.path.join(out, f"keys-rank{rank}.txt"), "a") as fh:
            fh.write(f"{epoch} {index} {','.join(batch['keys'])}\n")
