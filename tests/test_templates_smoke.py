"""Every shipped template runs: a few steps of real training (1 rank, tiny model, synthetic data),
with the template's own strategy, optimizer and schedule settings; only the model, data and
length are overridden."""

from __future__ import annotations

import glob
import os

import pytest

from tests.launch import ROOT, TINY, launch_many
from tests.test_strategies_dist import _lit_model_config, _start_weights

TEMPLATES = sorted(glob.glob(os.path.join(ROOT, "dsclip", "templates", "*.yaml")))


def _template_args(folder, template: str) -> list[str]:
    lit = os.path.basename(template).startswith("lit")
    model_json = _lit_model_config(folder) if lit else TINY
    start, _, trunk = _start_weights(folder, model_json)
    args = ["--config", template, "--model", model_json, "--pretrained", start, "--dataset-type", "synthetic",
            "--train-data", "", "--train-num-samples", "16", "--batch-size", "4", "--epochs", "1",
            "--max-steps", "2", "--precision", "fp32", "--workers", "0", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--eval-every-n-steps", "0", "--no-baseline-eval", "--report-to", "",
            "--logs-dir", str(folder), "--name", "run", "--threads", "1"]
    if lit:
        args += ["--pretrained-image", trunk]
    return args


@pytest.fixture(scope="module")
def template_runs(tmp_path_factory):
    """Every template's run, one after another in one process."""
    root = tmp_path_factory.mktemp("templates")
    names = [os.path.basename(t) for t in TEMPLATES]
    for name in names:
        (root / name).mkdir()
    results, _ = launch_many({n: _template_args(root / n, t) for n, t in zip(names, TEMPLATES)}, nproc=1,
                             launcher="python", timeout=900)
    return root, results


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: os.path.basename(p))
def test_template_smoke_runs(template_runs, template):
    root, results = template_runs
    name = os.path.basename(template)
    assert results[name].returncode == 0, results[name].stdout[-3000:]
    assert "done: 2 steps" in results[name].stdout
    assert (root / name / "run" / "final.safetensors").exists()
