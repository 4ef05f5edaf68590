"""The strategies benchmark runs end to end (smoke mode) and writes its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launch import run_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.dist
def test_strategies_benchmark_smoke(tmp_path):
    proc = run_process([sys.executable, str(ROOT / "benchmarks" / "strategies.py"), "--smoke", "--out",
                        str(tmp_path)], 300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads((tmp_path / "strategies.json").read_text())
    rows = {r["strategy"]: r for r in report["rows"]}
    assert set(rows) == {"full", "partial", "lock-image", "lock-text", "lit"}
    assert rows["full"]["mem_ratio"] == rows["full"]["time_ratio"] == 1.0
    assert all(r["peak_rss_bytes"] > 0 and r["step_s"] > 0 for r in rows.values())
    # freezing shrinks the trainable set, and the frozen run keeps fewer optimizer states
    assert rows["full"]["trainable_params"] == rows["full"]["total_params"]
    for name in ("partial", "lock-image", "lock-text", "lit"):
        assert rows[name]["trainable_params"] < rows[name]["total_params"]
    assert rows["partial"]["trainable_params"] < rows["lock-image"]["trainable_params"]
    assert report["hardware"]["cpu_count"] and report["hardware"]["deepspeed"]
    assert (tmp_path / "strategies.md").read_text().startswith("# Fine-tuning strategies")
