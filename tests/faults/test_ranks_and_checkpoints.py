"""Faults against real 2-rank jobs: a SIGKILLed rank, a hung rank, and a SIGKILL in the middle
of writing a checkpoint.  Each test records a row of the faults table, with the steps and samples
lost computed from what the runs traced (``DSCLIP_TRACE_KEYS``) and where the resumed run began."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import ROOT, TRAIN, cpu_env, free_port, kill_group, launch_many, launch_train, tiny_args

pytestmark = [pytest.mark.faults, pytest.mark.dist]

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval"]
SAMPLES_PER_EPOCH, EPOCHS, SAVE_EVERY = 64, 2, 2
KILL_STEP, HANG_STEP, KILL_TIMEOUT, HANG_TIMEOUT = 5, 3, 20, 8


def _args(tmp_path, name, *extra):
    # 2 ranks x batch 4 x 8 steps/epoch, 2 epochs = 16 steps, a checkpoint every 2 steps
    return tiny_args(str(tmp_path), name, "--epochs", str(EPOCHS), "--save-every-n-steps", str(SAVE_EVERY),
                     "--keep-last-n", "2", *NO_EVAL, *extra, steps_samples=SAMPLES_PER_EPOCH)


# ---------------------------------------------------------------- what a fault cost


def _trace(folder) -> dict[int, list[tuple[int, int, list[str]]]]:
    """rank -> [(epoch, micro batch in epoch, sample keys)] as ``DSCLIP_TRACE_KEYS`` wrote them."""
    out = {}
    for rank in (0, 1):
        path = Path(folder) / f"keys-rank{rank}.txt"
        lines = path.read_text().splitlines() if path.exists() else []
        out[rank] = [(int(e), int(i), keys.split(",")) for e, i, keys in (ln.split() for ln in lines if ln)]
    return out


def _resumed_at(output: str) -> tuple[int, int, int]:
    """(step, epoch, batch) where the resumed run began, from its own report."""
    m = re.search(r"resumed step_\d+ from .*: step (\d+), epoch (\d+), batch (\d+)", output)
    assert m, output[-3000:]
    return int(m[1]), int(m[2]), int(m[3])


def _cost(crashed_trace, resumed_trace, resumed_output: str) -> dict[str, int]:
    """Steps and samples a crash cost once resumed.  The training that counts is the crashed run up
    to where the resume began, then the resumed run; every epoch must see each sample once."""
    step, epoch, batch = _resumed_at(resumed_output)
    crashed, resumed = _trace(crashed_trace), _trace(resumed_trace)
    completed = min(len(lines) for lines in crashed.values())  # accum 1: one traced batch per step
    seen: dict[int, list[str]] = {}
    for rank in (0, 1):
        for e, i, keys in crashed[rank]:
            if (e, i) < (epoch, batch):
                seen.setdefault(e, []).extend(keys)
        for e, _, keys in resumed[rank]:
            seen.setdefault(e, []).extend(keys)
    return {"completed": completed, "resumed": step, "steps_lost": completed - step,
            "samples_lost": sum(SAMPLES_PER_EPOCH - len(set(seen.get(e, []))) for e in range(EPOCHS)),
            "duplicated": sum(len(keys) - len(set(keys)) for keys in seen.values())}


# ---------------------------------------------------------------- a rank dies, a rank hangs


def _launch_by_hand(args: list[str], out_dir, timeout: float, **env: str) -> dict:
    """Two ranks started as separate processes, as srun without torchrun would: nothing but the
    ranks themselves reports a failure.  Returns each rank's exit code and output, and how long
    rank 0 outlived rank 1."""
    port, procs = free_port(), []
    for rank in (0, 1):
        rank_env = cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
        with open(os.path.join(out_dir, f"rank{rank}.log"), "w") as log:
            procs.append(subprocess.Popen([sys.executable, TRAIN, *args], cwd=ROOT, env=rank_env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    ended: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(ended) < 2 and time.monotonic() < deadline:
            for rank, proc in enumerate(procs):
                if rank not in ended and proc.poll() is not None:
                    ended[rank] = time.monotonic()
            time.sleep(0.05)
    finally:
        for proc in procs:
            kill_group(proc)
            proc.wait()
    outputs = [(Path(out_dir) / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert len(ended) == 2, f"still running after {timeout}s:\n{outputs[0][-3000:]}"
    return {"rc": [p.returncode for p in procs], "out": outputs, "outlived": ended[0] - ended[1]}


@pytest.fixture(scope="module")
def dead_and_hung(tmp_path_factory):
    """Rank 1 SIGKILLed after step 5 (ranks started by hand), rank 1 hanging after step 3 (torchrun),
    then both runs resumed with --resume latest in one job."""
    root = tmp_path_factory.mktemp("ranks")
    for d in ("trace-killed", "trace-hung", "trace-killed-resumed", "trace-hung-resumed"):
        (root / d).mkdir()
    killed_args = _args(root, "killed", "--dist-timeout", str(KILL_TIMEOUT))
    hung_args = _args(root, "hung", "--dist-timeout", str(HANG_TIMEOUT))
    killed = _launch_by_hand(killed_args, root, timeout=240, DSCLIP_FAULT=f"kill_at_step:{KILL_STEP}",
                             DSCLIP_FAULT_RANKS="1", DSCLIP_TRACE_KEYS=str(root / "trace-killed"))
    t0 = time.monotonic()
    hung = launch_train(hung_args, timeout=240,
                        env=cpu_env(DSCLIP_FAULT=f"hang_at_step:{HANG_STEP}", DSCLIP_FAULT_RANKS="1",
                                    DSCLIP_TRACE_KEYS=str(root / "trace-hung")))
    hung_elapsed = time.monotonic() - t0
    latest = {name: (root / name / "checkpoints" / "latest").read_text() for name in ("killed", "hung")}
    resumed, _ = launch_many({name: (a + ["--resume", "latest"], {"DSCLIP_TRACE_KEYS": str(root / f"trace-{name}-resumed")})
                              for name, a in (("killed", killed_args), ("hung", hung_args))}, timeout=400)
    return {"root": root, "killed": killed, "hung": hung, "hung_elapsed": hung_elapsed, "latest": latest,
            "resumed": resumed}


def _errors(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith("dsclip: error:")]


def test_killed_rank_is_named_by_the_survivor_and_resume_loses_at_most_the_unsaved_steps(dead_and_hung, fault_row):
    killed, root = dead_and_hung["killed"], dead_and_hung["root"]
    assert killed["rc"][1] == -9, killed["out"][1][-3000:]  # the injected SIGKILL
    out = killed["out"][0]
    assert killed["rc"][0] == 1 and "Traceback" not in out, out[-3000:]
    # bounded: the survivor exits on its own, well within --dist-timeout, instead of hanging
    assert killed["outlived"] < KILL_TIMEOUT, killed["outlived"]
    errors = _errors(out)
    assert len(errors) == 1, out[-3000:]
    line = errors[0]
    assert re.search(r"error: rank 1 stopped \(its process is gone", line), line
    assert f"rank 0: step {KILL_STEP}" in line and f"rank 1: step {KILL_STEP}" in line, line
    assert "--resume latest" in line, line
    assert dead_and_hung["latest"]["killed"] == "step_00000004"
    resumed = dead_and_hung["resumed"]["killed"]
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    cost = _cost(root / "trace-killed", root / "trace-killed-resumed", resumed.stdout)
    assert cost["completed"] == KILL_STEP and cost["resumed"] == 4, cost
    assert 0 <= cost["steps_lost"] < SAVE_EVERY, cost  # at most the steps since the last checkpoint
    assert cost["samples_lost"] == 0 and cost["duplicated"] == 0, cost
    assert os.path.isfile(root / "killed" / "final.safetensors")
    fault_row.update(fault="rank SIGKILLed mid-run", injected=f"SIGKILL rank 1 after step {KILL_STEP} (ranks "
                     "started by hand, no torchrun)",
                     outcome=f"rank 0 exited {killed['outlived']:.1f}s later, one line naming rank 1; resumed "
                             f"from step {cost['resumed']} and finished",
                     steps_lost=cost["steps_lost"], samples_lost=cost["samples_lost"], checkpoints_lost=0)


def test_hung_rank_is_named_with_every_ranks_last_step(dead_and_hung, fault_row):
    hung, root = dead_and_hung["hung"], dead_and_hung["root"]
    assert hung.returncode != 0
    msgs = [ln for ln in hung.stdout.splitlines() if "made no progress" in ln]
    assert msgs, hung.stdout[-3000:]
    for msg in msgs:  # whichever rank's watchdog fired first, it names the same culprit
        assert f"rank 0: step {HANG_STEP}" in msg and f"rank 1: step {HANG_STEP}" in msg, msg
        assert "rank 1 (at dsclip/faultinject.py" in msg and "stalled outside any collective" in msg, msg
        assert "rank 0 waits for it" in msg and "--resume latest" in msg, msg
    assert dead_and_hung["hung_elapsed"] < 200
    resumed = dead_and_hung["resumed"]["hung"]
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    cost = _cost(root / "trace-hung", root / "trace-hung-resumed", resumed.stdout)
    assert cost["completed"] == HANG_STEP and dead_and_hung["latest"]["hung"] == "step_00000002", cost
    assert cost["samples_lost"] == 0 and cost["duplicated"] == 0, cost
    fault_row.update(fault="rank hangs in a collective", injected=f"rank 1 sleeps after step {HANG_STEP}",
                     outcome=f"watchdog error naming rank 1 as stalled, with each rank's last step, after "
                             f"{dead_and_hung['hung_elapsed']:.0f}s; resumed from step {cost['resumed']}",
                     steps_lost=cost["steps_lost"], samples_lost=cost["samples_lost"], checkpoints_lost=0)


# ---------------------------------------------------------------- a SIGKILL while a checkpoint is written


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
            p = SAVE_POINTS[i - 1]
            runs[f"resume-{p}"] = (args[p] + ["--resume", "latest"], {"DSCLIP_TRACE_KEYS": _trace_dir(root, p, "resumed")})
        if i < len(SAVE_POINTS):
            p = SAVE_POINTS[i]
            runs[f"crash-{p}"] = (args[p], {"DSCLIP_FAULT": f"kill_in_save:{p}:4",
                                            "DSCLIP_TRACE_KEYS": _trace_dir(root, p, "crashed")})
        results, _ = launch_many(runs, timeout=400)
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


def _trace_dir(root, point: str, kind: str) -> str:
    path = root / f"trace-{kind}-{point}"
    path.mkdir(exist_ok=True)
    return str(path)


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
    cost = _cost(_trace_dir(root, point, "crashed"), _trace_dir(root, point, "resumed"), proc.stdout)
    assert cost["completed"] == 4 and cost["resumed"] == 2, cost  # step 4 done, its save torn
    assert cost["samples_lost"] == 0 and cost["duplicated"] == 0, cost
    fault_row.update(fault=f"SIGKILL during checkpoint save ({point})", injected="SIGKILL all ranks in save of step 4",
                     outcome="latest still step 2; resumed from it and finished", steps_lost=cost["steps_lost"],
                     samples_lost=cost["samples_lost"], checkpoints_lost=0)
