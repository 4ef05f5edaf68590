"""Where metrics go: ``results.jsonl``, TensorBoard and (optionally) Weights & Biases.

One record per ``log`` call.  ``results.jsonl`` gets one JSON object per line,
``{"step", "epoch", "kind", "time", <metrics>}``, appended so a resumed run continues the same
file.  TensorBoard and W&B get the numeric metrics; a name without a ``/`` is filed under its
kind (``loss`` logged as ``train`` becomes ``train/loss``), names such as ``val/loss`` or
``zeroshot/imagenet/top1`` are kept as they are.  Only rank 0 writes; other ranks' loggers do
nothing, so every rank can call ``log`` unconditionally.

The config passed in is recorded as given: the caller masks secrets before passing it.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from .config import ConfigError

BACKENDS = ("tensorboard", "wandb")


def parse_report_to(report_to: str) -> list[str]:
    names = [n.strip().lower() for n in (report_to or "").split(",") if n.strip()]
    names = [n for n in names if n not in ("none", "all")] + (list(BACKENDS) if "all" in names else [])
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(
            f"--report-to {unknown[0]!r} is not supported; use a comma list of "
            f"{', '.join(BACKENDS)} (or '' for results.jsonl only)"
        )
    return list(dict.fromkeys(names))


def _number(value: Any) -> float | None:
    """A loggable float, or None for values TensorBoard/W&B cannot plot."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)  # 0-dim tensors and numpy scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        try:
            return float(item())
        except (TypeError, ValueError):
            return None
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, bool, int, type(None))):
        return value
    number = _number(value)
    if number is not None:
        return number if math.isfinite(number) else str(number)  # "nan"/"inf": strict JSON has no NaN
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


class MetricsLogger:
    """``log(metrics, step, kind, epoch)`` to every configured sink; ``close()`` at the end."""

    def __init__(self, run_dir: str, report_to: str, rank: int, config_dict: dict | None = None):
        self.run_dir, self.rank = run_dir, rank
        self.backends = parse_report_to(report_to)
        self.active = rank == 0
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if "wandb" in self.backends:
            self._wandb_module = _import_wandb()  # fail on every rank, before any work
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        # open for the run's lifetime, line-buffered so a crash loses at most the current record
        self._jsonl = open(os.path.join(run_dir, "results.jsonl"), "a", buffering=1)  # noqa: SIM115
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"))
        if "wandb" in self.backends:
            self._wandb = _start_wandb(self._wandb_module, run_dir, config_dict)

    def log(self, metrics: dict[str, Any], step: int, kind: str, epoch: int | None = None) -> None:
        if not self.active:
            return
        record = {"step": int(step), "epoch": epoch, "kind": kind, "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        scalars = {}
        for name, value in metrics.items():
            number = _number(value)
            if number is not None and math.isfinite(number):
                scalars[name if "/" in name else f"{kind}/{name}"] = number
        if self._tb is not None:
            for tag, number in scalars.items():
                self._tb.add_scalar(tag, number, global_step=int(step))
            texts = {k: v for k, v in metrics.items() if isinstance(v, str)}
            for name, text in texts.items():
                self._tb.add_text(name if "/" in name else f"{kind}/{name}", text, global_step=int(step))
            self._tb.flush()
        if self._wandb is not None and scalars:
            self._wandb.log({**scalars, "epoch": epoch} if epoch is not None else scalars, step=int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _import_wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "--report-to wandb needs the wandb package; `pip install wandb` (set WANDB_MODE=offline "
            "to log without a network) or drop wandb from --report-to"
        ) from None
    return wandb


def _start_wandb(wandb, run_dir: str, config_dict: dict | None):
    """A W&B run whose id is stored in the run dir, so a resumed job continues the same run.
    ``WANDB_MODE=offline`` (or ``disabled``) is honoured by wandb itself; nothing here needs a network."""
    id_path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.isfile(id_path):
        with open(id_path) as fh:
            run_id = fh.read().strip()
    else:
        import secrets

        run_id = secrets.token_hex(4)  # W&B's own id form: 8 lowercase alphanumerics
        with open(id_path, "w") as fh:
            fh.write(run_id)
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "dsclip"),
        name=os.path.basename(os.path.abspath(run_dir)),
        id=run_id,
        resume="allow",
        dir=run_dir,
        config=config_dict or {},
    )
