"""Learning-rate schedules as pure functions of the optimizer step.

A stateless schedule makes exact resume trivial: the lr of step ``s`` depends on ``s`` alone, so
there is no scheduler state to save or to get wrong.  Each parameter group keeps its own base
lr (``initial_lr``), which already includes per-tower and layer-decay scaling; the schedule
multiplies it by one shared factor.  Warmup follows open_clip: ``(step + 1) / warmup``.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_factor_fn(kind: str, warmup: int, total_steps: int, cooldown_steps: int = 0,
                 cooldown_power: float = 1.0, cooldown_end_ratio: float = 0.0) -> Callable[[int], float]:
    """Return ``factor(step)`` in [0, 1] for the schedule ``kind`` (cosine, const, const-cooldown)."""
    warmup = max(0, int(warmup))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "const":
            return 1.0
        if kind == "cosine":
            span = max(1, total_steps - warmup)
            progress = min(1.0, (step - warmup) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "const-cooldown":
            start = total_steps - cooldown_steps
            if step < start:
                return 1.0
            progress = min(1.0, (step - start) / max(1, cooldown_steps))
            return cooldown_end_ratio + (1.0 - cooldown_end_ratio) * (1.0 - progress ** cooldown_power)
        raise ValueError(f"unknown lr schedule {kind!r}")

    return factor


class GroupLR:
    """Sets every param group's lr to ``initial_lr * factor(step)`` before each optimizer step."""

    def __init__(self, optimizer, factor: Callable[[int], float]):
        self.optimizer = optimizer
        self.factor = factor
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def set_step(self, step: int) -> float:
        f = self.factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * f
        return f

    def current_lrs(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]
