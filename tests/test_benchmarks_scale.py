"""Smoke run of benchmarks/scale.py on the tiny model.  Its per-rank budget sits between the
plan's ZeRO-3 and ZeRO-0 estimates, so the run goes through the same path the real one does on
ViT-H-14: ZeRO-0 refused up front (no model built), ZeRO-3 trained, the ratio printed.
No timing or memory-size assertions: those are the committed results' job."""

import json
import os
import sys

import pytest

from tests.launch import ROOT, cpu_env, run_process


@pytest.mark.dist
@pytest.mark.slow
def test_scale_smoke_refuses_zero0_and_trains_zero3(tmp_path):
    proc = run_process([sys.executable, os.path.join(ROOT, "benchmarks", "scale.py"), "--smoke", "--out",
                        str(tmp_path), "--logs", str(tmp_path / "logs")], 900, cwd=ROOT, env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:]
    res = json.loads((tmp_path / "scale.json").read_text())
    assert res["big_zero0"]["exit"] != 0 and res["big_zero0"]["refused_up_front"], proc.stdout[-3000:]
    assert "at ZeRO-0" in res["big_zero0"]["message"] and "exceeds the" in res["big_zero0"]["message"]
    assert res["big_zero3"]["exit"] == 0 and len(res["big_zero3"]["peak_rss_gib"]) == 2, proc.stdout[-3000:]
    assert res["ratio"]["zero3_over_zero0_train_state"] > 0 and "per-rank ZeRO-3/ZeRO-0" in proc.stdout
    assert "refused up front: True" in (tmp_path / "scale.md").read_text()
