"""Faults against real 2-rank jobs: a SIGKILLed rank, a hung rank, and a SIGKILL in the middle
of writing a checkpoint.  Each test records a row of the faults table."""

from __future__ import annotations

import os
import time

import pytest

from tests.launch import cpu_env, launch_many, launch_train, tiny_args

pytestmark = [pytest.mark.faults, pytest.mark.dist]

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval"]


def _args(tmp_path, name, *extra):
    # 2 ranks x batch 4 x 8 steps/epoch, 2 epochs = 16 steps, a checkpoint every 2 steps
    return tiny_args(str(tmp_path), name, "--epochs", "2", "--save-every-n-steps", "2", "--keep-last-n", "2",
                     *NO_EVAL, *extra)


def test_killed_rank_stops_the_job_and_resume_loses_at_most_the_unsaved_steps(tmp_path, fault_row):
    args = _args(tmp_path, "run", "--dist-timeout", "20")
    t0 = time.monotonic()
    proc = launch_train(args, launcher="torchrun",
                        env=cpu_env(DSCLIP_FAULT="kill_at_step:5", DSCLIP_FAULT_RANKS="1"), timeout=240)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    # torchrun's failure report names the rank that died and how
    out = proc.stdout
    assert "rank      : 1" in out and ("Signal 9" in out or "exitcode  : -9" in out), out[-3000:]
    assert elapsed < 200
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert latest == "step_00000004"
    proc = launch_train(args + ["--resume", "latest"], launcher="torchrun")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed step_00000004" in proc.stdout
    fault_row.update(fault="rank SIGKILLed mid-run", injected="SIGKILL rank 1 after step 5",
                     outcome=f"job exited in {elapsed:.0f}s naming rank 1; resumed from step 4",
                     steps_lost=1, samples_lost=0, checkpoints_lost=0)


def test_hung_rank_is_reported_with_every_ranks_last_step(tmp_path, fault_row):
    args = _args(tmp_path, "run", "--dist-timeout", "8")
    t0 = time.monotonic()
    proc = launch_train(args, launcher="torchrun",
                        env=cpu_env(DSCLIP_FAULT="hang_at_step:3", DSCLIP_FAULT_RANKS="1"), timeout=240)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    msg = [ln for ln in proc.stdout.splitlines() if "made no progress" in ln]
    assert msg, proc.stdout[-3000:]
    assert "rank 0: step 3" in msg[0] and "rank 1: step 3" in msg[0] and "--resume latest" in msg[0]
    assert elapsed < 200
    fault_row.update(fault="rank hangs in a collective", injected="rank 1 sleeps after step 3",
                     outcome=f"watchdog error with each rank's last step after {elapsed:.0f}s",
                     steps_lost=1, samples_lost=0, checkpoints_lost=0)


SAVE_POINTS = ["before_optimizer_states", "after_engine_save", "before_latest"]


@pytest.fixture(scope="module")
def torn_saves(tmp_path_factory):
    """For each kill point: a run SIGKILLed (all ranks) at that point of its step-4 save, the
    checkpoint dir as the crash left it, and the run resumed with --resume latest.  Each job
    resumes the previous point's run, then crashes the next one: 4 jobs for 3 points."""
    root = tmp_path_factory.mktemp("torn")
    args = {p: _args(root, p) for p in SAVE_POINTS}
    after_crash, resumed = {}, {}
    for i in range(len(SAVE_POINTS) + 1):
        runs = {}
        if i > 0:
            runs[f"resume-{SAVE_POINTS[i - 1]}"] = args[SAVE_POINTS[i - 1]] + ["--resume", "latest"]
        if i < len(SAVE_POINTS):
            p = SAVE_POINTS[i]
            runs[f"crash-{p}"] = (args[p], {"DSCLIP_FAULT": f"kill_in_save:{p}:4"})
        results, _ = launch_many(runs, launcher="torchrun", timeout=400)
        for name, res in results.items():
            kind, point = name.split("-", 1)
            if kind == "resume":
                resumed[point] = res
                continue
            ckpts = root / point / "checkpoints"
            tag4 = ckpts / "step_00000004"
            after_crash[point] = {"rc": res.returncode, "latest": (ckpts / "latest").read_text(),
                                  "files": sorted(f.name for f in tag4.iterdir()) if tag4.is_dir() else None}
    return root, after_crash, resumed


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_sigkill_during_save_leaves_previous_checkpoint_valid(torn_saves, fault_row, point):
    root, after_crash, resumed = torn_saves
    crash = after_crash[point]
    assert crash["rc"] != 0
    assert crash["latest"] == "step_00000002"  # never points at the torn save
    files = crash["files"]
    assert files is not None and "mp_rank_00_model_states.pt" in files, files
    optimizer_written = any(f.endswith("optim_states.pt") for f in files)
    assert optimizer_written == (point != "before_optimizer_states"), files
    assert ("dsclip_manifest.json" in files) == (point == "before_latest"), files
    proc = resumed[point]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed step_00000002" in proc.stdout
    ckpts = root / point / "checkpoints"
    assert (root / point / "final.safetensors").exists()
    assert os.path.isfile(ckpts / "step_00000016" / "dsclip_manifest.json")
    fault_row.update(fault=f"SIGKILL during checkpoint save ({point})", injected="SIGKILL all ranks in save of step 4",
                     outcome="latest still step 2; resumed from it and finished", steps_lost=2, samples_lost=0,
                     checkpoints_lost=0)
