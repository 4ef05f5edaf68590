"""Smoke run of benchmarks/scale.py (tiny model): it runs its three launches and prints the
ZeRO-3/ZeRO-0 ratio line; no timing or memory assertions."""

import os
import sys

import pytest

from tests.launch import ROOT, cpu_env, run_process


@pytest.mark.dist
@pytest.mark.slow
def test_scale_smoke(tmp_path):
    proc = run_process([sys.executable, os.path.join(ROOT, "benchmarks", "scale.py"), "--smoke", "--out",
                        str(tmp_path), "--logs", str(tmp_path / "logs")], 900, cwd=ROOT, env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "ZeRO-3: exit 0" in proc.stdout and "per-rank ZeRO-3/ZeRO-0" in proc.stdout
    assert (tmp_path / "scale.json").exists()
