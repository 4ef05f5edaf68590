"""The data-throughput benchmark runs end to end in smoke mode and reports its ratios."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.launch import run_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_throughput_smoke(tmp_path):
    proc = run_process([sys.executable, str(ROOT / "benchmarks" / "data_throughput.py"), "--smoke",
                        "--out", str(tmp_path)], 300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    for name in ("s3_local_ratio", "loader_step_ratio"):
        values = [float(v) for v in re.findall(rf"^{name}\[w[12]\]: ([0-9.]+)", proc.stdout, re.MULTILINE)]
        assert len(values) == 2 and all(v > 0 for v in values), proc.stdout
    result = json.loads((tmp_path / "data_throughput.json").read_text())
    assert result["config"]["smoke"] and result["versions"]["torch"] and result["hardware"]["cores"]
    assert "S3/local" in (tmp_path / "data_throughput.md").read_text()
