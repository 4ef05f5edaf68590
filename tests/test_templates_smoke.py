"""Every shipped template runs: a few steps of real training (1 rank, tiny model, synthetic data),
with the template's own strategy, optimizer and schedule settings; only the model, data and
length are overridden."""

from __future__ import annotations

import glob
import os

import pytest

from tests.launch import ROOT, TINY, launch_train
from tests.test_strategies_dist import _lit_model_config, _start_weights

TEMPLATES = sorted(glob.glob(os.path.join(ROOT, "dsclip", "templates", "*.yaml")))


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: os.path.basename(p))
def test_template_smoke_runs(tmp_path, template):
    lit = os.path.basename(template).startswith("lit")
    model_json = _lit_model_config(tmp_path) if lit else TINY
    start, _, trunk = _start_weights(tmp_path, model_json)
    args = ["--config", template, "--model", model_json, "--pretrained", start, "--dataset-type", "synthetic",
            "--train-data", "", "--train-num-samples", "16", "--batch-size", "4", "--epochs", "1",
            "--max-steps", "2", "--precision", "fp32", "--workers", "0", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--eval-every-n-steps", "0", "--no-baseline-eval", "--report-to", "",
            "--logs-dir", str(tmp_path), "--name", "run", "--threads", "1"]
    if lit:
        args += ["--pretrained-image", trunk]
    proc = launch_train(args, nproc=1, launcher="python", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "done: 2 steps" in proc.stdout
    assert (tmp_path / "run" / "final.safetensors").exists()
