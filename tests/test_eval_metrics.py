"""MetricsLogger: results.jsonl, TensorBoard event files read back, W&B (offline) wiring."""

from __future__ import annotations

import glob
import os
import sys

import pytest
import torch

from dsclip.config import ConfigError
from dsclip.metrics import MetricsLogger, parse_report_to
from tests.test_eval_helpers import read_jsonl


def _scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb_dir)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_and_tensorboard(tmp_path):
    run = str(tmp_path / "run")
    log = MetricsLogger(run, "tensorboard", rank=0, config_dict={"optim": {"lr": 1e-3}})
    log.log({"zeroshot/pets/top1": 0.5, "val/loss": torch.tensor(1.25)}, step=0, kind="baseline", epoch=0)
    log.log({"loss": 2.0, "lr": 1e-3, "note": "warmup", "bad": float("nan")}, step=5, kind="train", epoch=0)
    log.log({"val/loss": 1.0, "val/image_to_text_R@1": 0.25}, step=10, kind="eval", epoch=1)
    log.close()

    records = read_jsonl(os.path.join(run, "results.jsonl"))
    assert [(r["step"], r["kind"], r["epoch"]) for r in records] == [
        (0, "baseline", 0),
        (5, "train", 0),
        (10, "eval", 1),
    ]
    assert records[0]["val/loss"] == 1.25 and records[1]["note"] == "warmup" and records[1]["bad"] == "nan"

    tb = _scalars(os.path.join(run, "tensorboard"))
    assert tb["val/loss"] == [(0, 1.25), (10, 1.0)]
    assert tb["zeroshot/pets/top1"] == [(0, 0.5)]
    assert tb["train/loss"] == [(5, 2.0)] and "train/lr" in tb and "val/image_to_text_R@1" in tb
    assert "train/bad" not in tb  # non-finite values stay out of the plots

    # a resumed run appends to the same file
    log = MetricsLogger(run, "", rank=0)
    log.log({"loss": 1.5}, step=11, kind="train")
    log.close()
    assert len(read_jsonl(os.path.join(run, "results.jsonl"))) == 4


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLogger(str(tmp_path / "r1"), "tensorboard", rank=1)
    log.log({"loss": 1.0}, step=1, kind="train")
    log.close()
    assert not os.path.exists(tmp_path / "r1")


def test_report_to_parsing():
    assert parse_report_to("") == [] and parse_report_to("none") == []
    assert parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ConfigError, match="mlflow"):
        parse_report_to("tensorboard,mlflow")


def test_wandb_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets where it is not installed
    with pytest.raises(ConfigError, match="pip install wandb"):
        MetricsLogger(str(tmp_path / "run"), "tensorboard,wandb", rank=0)


def test_wandb_offline_run_keeps_its_id_across_a_resume(tmp_path, monkeypatch):
    """Real wandb in offline mode (no network): the scalars land in the run dir's offline run,
    and a second logger on the same run dir (a resumed job) continues the same W&B run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = str(tmp_path / "run")
    log = MetricsLogger(run, "wandb", rank=0, config_dict={"run": {"name": "x"}})
    log.log({"loss": 2.0, "note": "text"}, step=3, kind="train", epoch=0)
    log.close()
    with open(os.path.join(run, "wandb_id.txt")) as fh:
        run_id = fh.read().strip()
    assert len(run_id) == 8
    log = MetricsLogger(run, "wandb", rank=0)
    log.log({"loss": 1.5}, step=4, kind="train", epoch=0)
    log.close()
    with open(os.path.join(run, "wandb_id.txt")) as fh:
        assert fh.read().strip() == run_id
    offline = sorted(glob.glob(os.path.join(run, "wandb", "offline-run-*")))
    # offline-run-<time>-<id>, with a -1 suffix when both started in the same second
    assert len(offline) == 2 and all(f"-{run_id}" in os.path.basename(d) for d in offline), offline
    data = b""
    for f in (f for d in offline for f in glob.glob(os.path.join(d, "*.wandb"))):
        with open(f, "rb") as fh:
            data += fh.read()
    assert b"train/loss" in data
    assert not os.path.exists(os.path.join(run, "tensorboard"))
