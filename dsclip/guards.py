"""Guards for robust fine-tuning: overfitting and forgetting warnings, early stop, keep-best.

``Guards.update`` is called after every evaluation with the latest train loss and the eval
metrics, and answers with a ``GuardDecision``:
  * overfitting: ``val/loss`` rose at each of the last K (``--overfit-patience``) evaluations
    while the train loss fell over the same window;
  * forgetting: some ``zeroshot/<name>/top1`` is more than X (``--forget-threshold``) percentage
    points below its baseline, the first value seen (normally the baseline eval at step 0);
  * ``stop`` when ``--early-stop`` names a guard that fired (``any`` for either);
  * ``is_best`` when the ``--keep-best`` metric improved on every earlier evaluation after step 0.
    The direction is minimise for names with ``loss`` or ``rank``, maximise otherwise; a leading
    ``-`` forces minimise and ``+`` maximise.  The step-0 baseline is never "best" (there is no
    checkpoint of it to keep), but fine-tuned evaluations still have to beat it.

State survives resume through ``state_dict``/``load_state_dict`` (plain JSON-able values).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

_ZS_TOP1 = re.compile(r"^zeroshot/(?!mean_top1$)(.+)/top1$")
VAL_LOSS = "val/loss"


@dataclass
class GuardDecision:
    warnings: list[str] = field(default_factory=list)
    stop: bool = False
    is_best: bool = False


def parse_keep_best(spec: str | None) -> tuple[str, bool] | None:
    """(metric name, minimise?) for ``--keep-best``; None when off."""
    if not spec:
        return None
    spec = spec.strip()
    if spec[0] in "+-":
        return spec[1:], spec[0] == "-"
    lowered = spec.lower()
    return spec, ("loss" in lowered or "rank" in lowered)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


class Guards:
    def __init__(self, cfg_eval: Any):
        self.patience = int(cfg_eval.overfit_patience)
        self.forget_threshold = float(cfg_eval.forget_threshold)
        self.early_stop = cfg_eval.early_stop
        self.keep_best = parse_keep_best(cfg_eval.keep_best)
        self.history: list[tuple[int, float, float]] = []  # (step, train loss, val loss)
        self.baseline: dict[str, float] = {}
        self.best: float | None = None
        self.best_step: int | None = None
        self._missing_warned = False

    # ------------------------------------------------------------ the decision

    def update(self, step: int, train_loss: float | None, metrics: dict[str, float]) -> GuardDecision:
        decision = GuardDecision()
        overfit = self._check_overfit(step, train_loss, metrics, decision.warnings)
        forget = self._check_forget(metrics, decision.warnings)
        decision.stop = (overfit and self.early_stop in ("overfit", "any")) or (
            forget and self.early_stop in ("forget", "any")
        )
        if decision.stop:
            decision.warnings.append(f"early stop (--early-stop {self.early_stop}) at step {step}")
        decision.is_best = self._check_best(step, metrics, decision.warnings)
        return decision

    def _check_overfit(
        self, step: int, train_loss: float | None, metrics: dict[str, float], warnings: list[str]
    ) -> bool:
        val = metrics.get(VAL_LOSS)
        if not _finite(val):
            return False
        self.history.append((step, float(train_loss) if _finite(train_loss) else math.nan, float(val)))
        k = self.patience
        if k <= 0 or len(self.history) < k + 1:
            return False
        window = self.history[-(k + 1) :]
        vals = [v for _, _, v in window]
        rising = all(b > a for a, b in itertools.pairwise(vals))
        t0, t1 = window[0][1], window[-1][1]
        falling = math.isfinite(t0) and math.isfinite(t1) and t1 < t0
        if rising and falling:
            warnings.append(
                f"overfitting: val loss rose {k} evaluations in a row ({vals[0]:.4f} -> {vals[-1]:.4f}, "
                f"steps {window[0][0]}-{window[-1][0]}) while train loss fell ({t0:.4f} -> {t1:.4f})"
            )
            return True
        return False

    def _check_forget(self, metrics: dict[str, float], warnings: list[str]) -> bool:
        fired = False
        for name, value in sorted(metrics.items()):
            if not _ZS_TOP1.match(name) or not _finite(value):
                continue
            if name not in self.baseline:
                self.baseline[name] = float(value)
                continue
            drop = 100.0 * (self.baseline[name] - value)
            if self.forget_threshold >= 0 and drop > self.forget_threshold:
                dataset = _ZS_TOP1.match(name).group(1)
                warnings.append(
                    f"forgetting: zero-shot top-1 on {dataset} is {100 * value:.2f}%, {drop:.2f} points "
                    f"below the baseline {100 * self.baseline[name]:.2f}% "
                    f"(--forget-threshold {self.forget_threshold:g})"
                )
                fired = True
        return fired

    def _resolve(self, metrics: dict[str, float]) -> str | None:
        name = self.keep_best[0]
        if name in metrics:
            return name
        matches = [k for k in metrics if k.endswith("/" + name)]
        return matches[0] if len(matches) == 1 else None

    def _check_best(self, step: int, metrics: dict[str, float], warnings: list[str]) -> bool:
        if self.keep_best is None:
            return False
        key = self._resolve(metrics)
        if key is None or not _finite(metrics[key]):
            if not self._missing_warned and metrics:
                warnings.append(
                    f"--keep-best {self.keep_best[0]!r} is not among the evaluated metrics "
                    f"({', '.join(sorted(metrics))}); no best checkpoint is kept until it appears"
                )
                self._missing_warned = True
            return False
        value, minimise = float(metrics[key]), self.keep_best[1]
        better = self.best is None or (value < self.best if minimise else value > self.best)
        if not better:
            return False
        self.best = value
        if step == 0:
            return False
        self.best_step = step
        return True

    # ------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [list(h) for h in self.history],
            "baseline": dict(self.baseline),
            "best": self.best,
            "best_step": self.best_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state.get("history", [])]
        self.baseline = dict(state.get("baseline", {}))
        self.best = state.get("best")
        self.best_step = state.get("best_step")
