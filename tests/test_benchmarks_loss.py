"""The loss-memory benchmark runs end to end (smoke mode) and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.dist
def test_loss_memory_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "loss_memory.py"), "--smoke", "--out", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "naive/local memory ratio" in proc.stdout
    assert "largest global batch in 8 GiB/rank" in proc.stdout
    report = json.loads((tmp_path / "loss_memory.json").read_text())
    assert {r["mode"] for r in report["rows"]} == {"naive", "local"}
    assert all(r["peak_bytes"] > 0 and r["time_s"] > 0 for r in report["rows"])
    assert report["hardware"]["cpu_count"] and report["hardware"]["torch"]
    assert (tmp_path / "loss_memory.md").read_text().startswith("# CLIP loss memory")
