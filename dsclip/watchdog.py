"""A per-rank watchdog for hung or orphaned ranks.

Each rank records its last completed optimizer step in a heartbeat file in the run dir.  A
daemon thread checks that the step keeps moving; when it has not moved for ``timeout`` seconds
(a peer died or hangs inside a collective, which can block forever on some backends), the rank
prints one clear error with every rank's last completed step and exits, instead of hanging.
"""

from __future__ import annotations

import os
import sys
import threading
import time


class Watchdog:
    def __init__(self, run_dir: str, rank: int, world: int, timeout: float, poll: float | None = None):
        self.dir = os.path.join(run_dir, ".heartbeat")
        os.makedirs(self.dir, exist_ok=True)
        self.rank, self.world, self.timeout = rank, world, timeout
        self.poll = poll or max(0.5, min(10.0, timeout / 10))
        self.step, self.last_change = -1, time.monotonic()
        self.paused = False
        self._stop = threading.Event()
        self.beat(0)
        self._thread = threading.Thread(target=self._watch, name="dsclip-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        self.step, self.last_change = step, time.monotonic()
        path = os.path.join(self.dir, f"rank{self.rank}")
        with open(path + ".tmp", "w") as fh:
            fh.write(f"{step} {time.time():.3f}")
        os.replace(path + ".tmp", path)

    def last_steps(self) -> dict[int, str]:
        out = {}
        for r in range(self.world):
            try:
                with open(os.path.join(self.dir, f"rank{r}")) as fh:
                    step, stamp = fh.read().split()
                out[r] = f"step {step} ({time.time() - float(stamp):.0f}s ago)"
            except (OSError, ValueError):
                out[r] = "no heartbeat"
        return out

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            if self.paused:  # long non-step work (evaluation, export) beats on its own schedule
                self.last_change = time.monotonic()
                continue
            stalled = time.monotonic() - self.last_change
            if stalled > self.timeout:
                steps = ", ".join(f"rank {r}: {s}" for r, s in self.last_steps().items())
                print(f"dsclip: error: rank {self.rank} made no progress for {stalled:.0f}s after step {self.step} "
                      f"(--dist-timeout {self.timeout:g}); a peer rank died or hangs. Last completed steps: "
                      f"{steps}. Restart with --resume latest.", file=sys.stderr, flush=True)
                os._exit(3)

    def close(self) -> None:
        self._stop.set()
