"""The throughput, efficiency and memory benchmarks and gpu.sh's CPU dry run work end to end.

The four smoke runs are started two at a time (see ``smoke_runs``); each test then checks one.
No timing assertions: only that they run, print their ratios and write their reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import kill_group

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NAMES = ("throughput", "efficiency", "memory")


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Two at a time: each run is mostly process start-up, which two runs share the 2 cores
    well; four at once would hold a dozen interpreters (~1 GB each) in memory together."""
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    commands = {n: ([sys.executable, str(BENCH / f"{n}.py"), "--smoke", "--out", str(out / n)], env) for n in NAMES}
    commands["gpu"] = (["bash", str(BENCH / "gpu.sh")], {**env, "DRY_RUN": "cpu", "OUT_DIR": str(out / "gpu")})
    results = {}
    for pair in (("throughput", "gpu"), ("memory", "efficiency")):
        procs = {n: subprocess.Popen(commands[n][0], cwd=ROOT, env=commands[n][1], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True) for n in pair}
        try:
            for n, p in procs.items():
                stdout, _ = p.communicate(timeout=600)
                results[n] = (p.returncode, stdout)
        finally:
            for p in procs.values():
                kill_group(p)
    return out, results


def _ok(smoke_runs, name):
    out, results = smoke_runs
    rc, stdout = results[name]
    assert rc == 0, stdout[-4000:]
    return out / name, stdout


def _check_report(folder: Path, name: str) -> dict:
    report = json.loads((folder / f"{name}.json").read_text())
    assert report["hardware"]["cpu_count"] and report["hardware"]["cpu_model"] and report["hardware"]["torch"]
    assert report["date"] and report["config"]["smoke"] is True
    assert (folder / f"{name}.md").read_text().startswith("# ")
    return report


@pytest.mark.dist
def test_throughput_smoke(smoke_runs):
    folder, stdout = _ok(smoke_runs, "throughput")
    assert "dsclip/open_clip ratio:" in stdout
    assert "dsclip ZeRO-2 2 ranks:" in stdout and "backward" in stdout
    report = _check_report(folder, "throughput")
    assert report["ratio_dsclip_over_open_clip"] > 0
    assert report["two_ranks"][0]["breakdown"]["total"] > 0


@pytest.mark.dist
def test_efficiency_smoke(smoke_runs):
    folder, stdout = _ok(smoke_runs, "efficiency")
    assert "efficiency (achieved/peak):" in stdout
    report = _check_report(folder, "efficiency")
    assert report["flops_per_sample"] > 0 and report["peak_flops"] > 0 and report["efficiency"] > 0


@pytest.mark.dist
def test_memory_smoke(smoke_runs):
    folder, stdout = _ok(smoke_runs, "memory")
    assert "ZeRO-3/ZeRO-0 model-state ratio:" in stdout
    assert "largest per-rank batch in 8 GiB/rank, ZeRO-3:" in stdout
    report = _check_report(folder, "memory")
    assert {r["stage"] for r in report["rows"]} == {"ZeRO-0", "ZeRO-3"}
    assert all(r["peak_gib"] > r["baseline_gib"] > 0 for r in report["rows"])
    assert "Estimated memory needed" in report["estimator"]["all_live_tables"]


@pytest.mark.dist
def test_gpu_script_cpu_dry_run(smoke_runs):
    folder, stdout = _ok(smoke_runs, "gpu")
    assert "dsclip/train.py" in stdout and "samples_per_s_per_gpu" in stdout
    rows = json.loads((folder / "gpu.json").read_text())["rows"]
    assert rows[0]["samples_per_s_per_gpu"] > 0 and rows[0]["mfu"] > 0


def test_gpu_script_dry_run_prints_commands():
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh")], check=False, cwd=ROOT, env={**os.environ, "DRY_RUN": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for needle in ("ViT-B-32", "ViT-L-14-336", "bf16", "zero2.json", "zero3.json", "--local-loss"):
        assert needle in proc.stdout
