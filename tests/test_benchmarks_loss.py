"""The loss-memory benchmark runs end to end (smoke mode) and writes its report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.launch import run_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.dist
def test_loss_memory_smoke(tmp_path):
    proc = run_process([sys.executable, str(ROOT / "benchmarks" / "loss_memory.py"), "--smoke", "--out",
                        str(tmp_path)], 300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "naive/local memory ratio" in proc.stdout
    assert "largest global batch in 8 GiB/rank" in proc.stdout
    report = json.loads((tmp_path / "loss_memory.json").read_text())
    assert {r["mode"] for r in report["rows"]} == {"naive", "local"}
    assert all(r["peak_bytes"] > 0 and r["time_s"] > 0 for r in report["rows"])
    assert report["hardware"]["cpu_count"] and report["hardware"]["torch"]
    assert (tmp_path / "loss_memory.md").read_text().startswith("# CLIP loss memory")
