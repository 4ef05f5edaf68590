"""A per-rank watchdog for hung or orphaned ranks, and the diagnosis of which rank stopped.

Each rank keeps a heartbeat file in ``RUN/.heartbeat/``: its last completed optimizer step and
when it completed, and, refreshed by a daemon thread every ``poll`` seconds, a liveness stamp,
its host and pid, and where its main thread is (inside a collective or not).  The thread also
checks that the step keeps moving; when it has not moved for ``timeout`` seconds (a peer died or
hangs, and a collective can block forever on some backends) the rank prints one line naming the
rank(s) that stopped, with every rank's last completed step, and exits instead of hanging.

When a collective fails outright instead (gloo: "Connection reset by peer"), ``main`` asks
``peer_failure_message`` for the same diagnosis.  A rank that stopped is one that failed with an
error of its own, whose process is gone (same host) or whose liveness stamp went stale; a rank
that stalls is one that is alive but outside any collective while the others wait inside one.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any

HOST = socket.gethostname()
# innermost frames from these packages mean the main thread is waiting in a collective
_COLLECTIVE_PATHS = (os.sep + os.path.join("torch", "distributed") + os.sep,
                     os.sep + os.path.join("deepspeed", "comm") + os.sep)
_ACTIVE: Watchdog | None = None


class Watchdog:
    def __init__(self, run_dir: str, rank: int, world: int, timeout: float, poll: float | None = None):
        global _ACTIVE
        self.dir = os.path.join(run_dir, ".heartbeat")
        os.makedirs(self.dir, exist_ok=True)
        self.rank, self.world, self.timeout = rank, world, timeout
        self.poll = poll or max(0.5, min(10.0, timeout / 10))
        self.step, self.last_change = -1, time.monotonic()
        self.job = _job_id()
        self.paused = False
        self.state = "running"
        self._where: dict[str, Any] = {"collective": None, "at": ""}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.beat(0)
        _ACTIVE = self
        self._thread = threading.Thread(target=self._watch, name="dsclip-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last_change = step, time.monotonic()
        self._step_time = time.time()
        self._write()

    def _write(self) -> None:
        record = {"job": self.job, "step": self.step, "step_time": self._step_time, "alive": time.time(),
                  "host": HOST, "pid": os.getpid(), "state": self.state, **self._where}
        path = os.path.join(self.dir, f"rank{self.rank}")
        with self._lock:  # the step (main thread) and liveness (watchdog thread) share one file
            try:
                with open(path + ".tmp", "w") as fh:
                    json.dump(record, fh)
                os.replace(path + ".tmp", path)
            except OSError:  # a shared filesystem's hiccup must not kill the rank; the next beat retries
                pass

    def heartbeats(self) -> dict[int, dict | None]:
        """Every rank's heartbeat record of this run (None: none yet, or one left by an earlier run)."""
        out: dict[int, dict | None] = {}
        for r in range(self.world):
            try:
                with open(os.path.join(self.dir, f"rank{r}")) as fh:
                    rec = json.load(fh)
            except (OSError, ValueError):
                rec = None
            out[r] = rec if isinstance(rec, dict) and rec.get("job") == self.job else None  # else an earlier run's
        return out

    def last_steps(self, beats: dict[int, dict | None] | None = None) -> str:
        beats = self.heartbeats() if beats is None else beats
        now, parts = time.time(), []
        for r, rec in beats.items():
            if rec is None:
                parts.append(f"rank {r}: no heartbeat")
                continue
            where = f", in {rec['collective']}" if rec.get("collective") else ""
            parts.append(f"rank {r}: step {rec['step']} ({now - rec['step_time']:.0f}s ago{where})")
        return ", ".join(parts)

    def stopped(self, beats: dict[int, dict | None]) -> dict[int, str]:
        """Ranks whose process is gone or whose liveness stamp went stale -> why we think so."""
        now, out = time.time(), {}
        for r, rec in beats.items():
            if r == self.rank:
                continue
            if rec is None:
                out[r] = "no heartbeat"
            elif rec.get("state") == "failed":
                out[r] = f"it failed with an error of its own after step {rec['step']}; see its log"
            elif rec.get("state") != "running":  # it saw the failure too and is exiting, or it finished
                continue
            elif rec.get("host") == HOST and not _pid_alive(rec.get("pid", -1)):
                out[r] = f"its process is gone; last heartbeat {now - rec['alive']:.0f}s ago, after step {rec['step']}"
            elif now - rec["alive"] > 3 * self.poll:
                out[r] = f"no heartbeat for {now - rec['alive']:.0f}s, after step {rec['step']}"
        return out

    def diagnose(self, settle: float = 0.0) -> tuple[str, dict[int, dict | None]]:
        """(which ranks stopped or stall, in words; the heartbeats read).  With ``settle`` it waits
        up to that long for a peer on another host to go stale: its liveness stamp lags by up to
        one poll when a collective fails at once."""
        deadline = time.monotonic() + settle
        while True:
            beats = self.heartbeats()
            stopped = self.stopped(beats)
            if stopped or time.monotonic() >= deadline:
                break
            time.sleep(min(self.poll, 0.5))
        if stopped:
            return "; ".join(f"rank {r} stopped ({why})" for r, why in sorted(stopped.items())), beats
        alive = {r: rec for r, rec in beats.items() if rec is not None}
        outside = [r for r, rec in alive.items() if not rec.get("collective")]
        inside = [r for r, rec in alive.items() if rec.get("collective")]
        if outside and inside:
            names = ", ".join(f"rank {r} (at {alive[r].get('at') or 'unknown'})" for r in outside)
            return (f"{names} stalled outside any collective while {_ranks(inside)} "
                    f"wait{'s' if len(inside) == 1 else ''} for {'it' if len(outside) == 1 else 'them'} "
                    f"in one"), beats
        if inside:
            return "every rank waits inside a collective (mismatched collectives or a network problem)", beats
        return "no rank is inside a collective", beats

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            self._where = _main_thread_location()
            self._write()  # liveness, and where this rank is, for the others' diagnosis
            if self.paused:  # long non-step work (evaluation, export) beats on its own schedule
                self.last_change = time.monotonic()
                continue
            stalled = time.monotonic() - self.last_change
            if stalled > self.timeout:
                self.state = "aborting"
                self._write()
                why, beats = self.diagnose()
                print(f"dsclip: error: rank {self.rank} made no progress for {stalled:.0f}s after step {self.step} "
                      f"(--dist-timeout {self.timeout:g}): {why}. Last completed steps: {self.last_steps(beats)}. "
                      f"Restart with --resume latest.", file=sys.stderr, flush=True)
                os._exit(3)

    def close(self, state: str = "finished") -> None:
        global _ACTIVE
        self._stop.set()
        if self.state == "running":
            self.state = state
            self._write()
        if _ACTIVE is self:
            _ACTIVE = None


def _job_id() -> str:
    """One id for this job on every rank (rank 0's, broadcast), to tell its heartbeats from those an
    earlier run left in the same run dir.  Collective: every rank builds its watchdog."""
    job = [f"{HOST}-{os.getpid()}-{time.time():.3f}"]
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(job, src=0)
    return job[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def _main_thread_location() -> dict[str, Any]:
    """Where the main thread is: the collective it waits in (innermost torch.distributed or
    deepspeed.comm frame), else its innermost frame as ``file:line function``."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    innermost = frame
    while frame is not None:
        if any(p in frame.f_code.co_filename for p in _COLLECTIVE_PATHS):
            return {"collective": frame.f_code.co_name, "at": ""}
        frame = frame.f_back
    if innermost is None:
        return {"collective": None, "at": ""}
    parts = innermost.f_code.co_filename.split(os.sep)
    return {"collective": None, "at": f"{'/'.join(parts[-2:])}:{innermost.f_lineno} {innermost.f_code.co_name}"}


# a collective that failed because its peer is gone, as the backends word it
_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
              "NCCL communicator was aborted", "remote process exited", "Socket closed")


def is_peer_failure(exc: BaseException) -> bool:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return False
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _PEER_GONE)


def peer_failure_message(exc: BaseException) -> str | None:
    """One line for a collective that failed because a peer rank stopped, naming that rank from the
    heartbeats; None when ``exc`` is not such a failure.  Closes this rank's watchdog."""
    if not is_peer_failure(exc):
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # gloo prefixes its source location and appends advice; keep the error itself
    cause = f"{type(exc).__name__}: {first.split('] ', 1)[-1].split('. ', 1)[0][:120]}"
    wd = _ACTIVE
    if wd is None:  # failed before training started: no heartbeats to read
        return (f"dsclip: error: a collective failed ({cause}); a peer rank stopped before training began. "
                f"Check the other ranks' logs, then restart the job with --resume latest.")
    wd.state = "aborting"
    wd._write()
    why, beats = wd.diagnose(settle=4 * wd.poll)
    wd.close(state="aborting")
    return (f"dsclip: error: {why}, so rank {wd.rank}'s collective failed ({cause}). Last completed steps: "
            f"{wd.last_steps(beats)}. Restart the job with --resume latest.")


def close_active() -> None:
    """Stop this process's watchdog, if a failed run left one running; the peers' diagnosis then
    names this rank as the one that failed."""
    if _ACTIVE is not None:
        _ACTIVE.close(state="failed")
