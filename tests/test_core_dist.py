"""Core end to end: real 2-rank DeepSpeed jobs on CPU (gloo) with the tiny model config.

Covers the deepspeed launcher and torchrun, ZeRO-2 and ZeRO-3, a falling loss, bit-exact
resume after a real SIGKILL, and the export round trip through plain open_clip.
"""

from __future__ import annotations

import glob
import json
import os
import re

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from tests.launch import TINY, launch_many, launch_train, tiny_args

pytestmark = pytest.mark.dist

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval"]
# 2 ranks x batch 4, 64 samples: 8 steps/epoch; 2 epochs = 16 steps; a checkpoint at step 5
# lands mid-epoch, so resume must restore the data position inside the epoch.  Patch dropout
# draws from torch's RNG every step, so the weights only match if every rank's RNG state is
# restored too.
RESUME_ARGS = ["--epochs", "2", "--save-every-n-steps", "5", "--keep-last-n", "3", "--force-patch-dropout", "0.3",
               *NO_EVAL]


def train_losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "results.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


def reload_in_open_clip(path: str):
    open_clip.add_model_config(TINY)
    model = open_clip.create_model("tiny-clip", pretrained=path, output_dict=True)  # strict key loading
    return model.eval()


def assert_export_matches_engine(run_dir: str, weights: str) -> None:
    """The engine's embeddings of a probe batch (recorded by the trainer) equal plain open_clip's
    embeddings after loading the exported file."""
    probe = torch.load(os.path.join(run_dir, "export_check.pt"), weights_only=True)
    model = reload_in_open_clip(weights)
    with torch.no_grad():
        out = model(image=probe["image"], text=probe["text"])
    assert (out["image_features"] - probe["image_features"]).abs().max() < 1e-5
    assert (out["text_features"] - probe["text_features"]).abs().max() < 1e-5


@pytest.mark.parametrize("stage,launcher", [("zero2", "deepspeed"), ("zero3", "torchrun")])
def test_trains_and_exports(tmp_path, stage, launcher):
    args = tiny_args(str(tmp_path), "run", "--ds_config", f"ds_configs/{stage}.json", "--epochs", "3",
                     *NO_EVAL, steps_samples=128)
    proc = launch_train(args, nproc=2, launcher=launcher)
    assert proc.returncode == 0, proc.stdout[-4000:]
    run_dir = tmp_path / "run"
    assert f"ZeRO-{stage[-1]}" in proc.stdout and "2 rank(s)" in proc.stdout
    # the progress line: epoch, step/total, loss, lr, samples/s global and per rank, data wait, ETA
    progress = re.findall(r"^epoch (\d+)/3 step (\d+)/48 \(\d+%\) loss [0-9.]+ lr [0-9.e+-]+ samples/s [0-9.]+ "
                          r"\([0-9.]+/rank\) data \d+%.* eta \d+:\d\d:\d\d$", proc.stdout, flags=re.MULTILINE)
    assert [int(s) for _, s in progress] == list(range(2, 49, 2)), proc.stdout[-3000:]
    losses = train_losses(str(run_dir))
    assert len(losses) >= 4
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses  # it learns
    final = str(run_dir / "final.safetensors")
    assert_export_matches_engine(str(run_dir), final)
    # `dsclip export` of the same run gives the same tensors, also as .pt
    out = tmp_path / "export.pt"
    from dsclip.export import main as export_main

    assert export_main([str(run_dir), str(out)]) == 0
    a, b = load_file(final), torch.load(out, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["logit_scale"].shape == torch.Size([])  # open_clip's own shape, not DeepSpeed's [1]
    assert_export_matches_engine(str(run_dir), str(out))
    params = (run_dir / "params.yaml").read_text()
    assert "batch_size: 4" in params


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_sigkill_then_resume_is_bit_identical(tmp_path, stage):
    base = tiny_args(str(tmp_path), "full", "--ds_config", f"ds_configs/{stage}.json", *RESUME_ARGS)
    crashed = tiny_args(str(tmp_path), "crash", "--ds_config", f"ds_configs/{stage}.json", *RESUME_ARGS)
    # the uninterrupted run, then the same run SIGKILLed (both ranks) after step 7
    results, job = launch_many({"full": base, "crash": (crashed, {"DSCLIP_FAULT": "kill_at_step:7"})})
    assert results["full"].returncode == 0, results["full"].stdout[-4000:]
    assert job.returncode != 0 and results["crash"].returncode != 0
    assert "step 6/16" in results["crash"].stdout and "step 8/16" not in results["crash"].stdout
    # DeepSpeed's shared-memory buffers of the killed ranks are gone with them (RAM-backed /dev/shm)
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{job.port}_*")
    ckpts = tmp_path / "crash" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000005"
    assert not (tmp_path / "crash" / "final.safetensors").exists()

    proc = launch_train(crashed + ["--resume", "latest"])  # a fresh job
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "resumed step_00000005" in proc.stdout and "batch 5" in proc.stdout
    a = (tmp_path / "full" / "final.safetensors").read_bytes()
    b = (tmp_path / "crash" / "final.safetensors").read_bytes()
    assert a == b, "resumed run's weights differ from the uninterrupted run's"


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_config_error_printed_once_with_exit_2(tmp_path, launcher):
    args = tiny_args(str(tmp_path), "bad", "--ds_config", "ds_configs/does-not-exist.json")
    proc = launch_train(args, nproc=2, launcher=launcher, timeout=300)
    # the deepspeed launcher passes the ranks' exit code on; torchrun reports any failure as 1
    assert proc.returncode == (2 if launcher == "deepspeed" else 1), proc.stdout[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if "dsclip: error:" in ln]
    assert len(lines) == 1, proc.stdout[-3000:]
    assert "does-not-exist.json" in lines[0] and "--ds_config" in lines[0]
    assert not (tmp_path / "bad").exists()  # nothing built, nothing written


def test_every_other_shipped_ds_config_trains(tmp_path):
    """ZeRO-0, ZeRO-1 and ZeRO-3 with offload (ZeRO-2 and 3 are trained above) in one job; the
    ZeRO-0 run saves by epoch (--save-frequency 1) and is exported through the `dsclip` CLI."""
    runs = {stage: tiny_args(str(tmp_path), stage, "--ds_config", f"ds_configs/{stage}.json", "--max-steps", "3",
                             *NO_EVAL, steps_samples=32)
            for stage in ("zero1", "zero3_offload")}
    runs["zero0"] = tiny_args(str(tmp_path), "zero0", "--ds_config", "ds_configs/zero0.json", "--epochs", "2",
                              "--save-frequency", "1", "--keep-last-n", "5", *NO_EVAL, steps_samples=32)
    results, _ = launch_many(runs)
    for name, stage in (("zero0", 0), ("zero1", 1), ("zero3_offload", 3)):
        assert results[name].returncode == 0, results[name].stdout[-4000:]
        assert f"ZeRO-{stage}" in results[name].stdout
        assert_export_matches_engine(str(tmp_path / name), str(tmp_path / name / "final.safetensors"))
    from dsclip.checkpoint import complete_tags
    from dsclip.cli import main as cli_main

    ckpts = tmp_path / "zero0" / "checkpoints"
    assert complete_tags(str(ckpts)) == ["step_00000004", "step_00000008"]  # one per epoch
    out = tmp_path / "epoch1.pt"
    assert cli_main(["export", str(ckpts), str(out), "--tag", "step_00000004"]) == 0
    first_epoch = torch.load(out, weights_only=True)
    final = load_file(str(tmp_path / "zero0" / "final.safetensors"))
    assert first_epoch.keys() == final.keys() and not torch.equal(first_epoch["visual.proj"], final["visual.proj"])


def _aio_builds() -> bool:
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return bool(AsyncIOBuilder().is_compatible(verbose=False))
    except (ImportError, RuntimeError, OSError):
        return False


# the async-I/O op is a compiled DeepSpeed extension: without libaio's headers it cannot be built
# on the machine at all, which says nothing about dsclip; CI installs them, so there it runs
@pytest.mark.skipif(not _aio_builds(), reason="DeepSpeed's async-I/O op needs libaio-dev (apt-get install libaio-dev; "
                                              ".ci/run installs it)")
def test_zero3_nvme_offload_trains_resumes_and_exports(tmp_path):
    """ZeRO-Infinity (ds_configs/zero3_nvme.json) on a local directory: optimizer state and
    parameters are swapped to files under --nvme-path, a resumed run continues, the export
    matches the engine."""
    nvme = tmp_path / "swap"
    nvme.mkdir()
    base = tiny_args(str(tmp_path), "nvme", "--ds_config", "ds_configs/zero3_nvme.json", "--nvme-path", str(nvme),
                     *NO_EVAL, "--save-every-n-steps", "2", steps_samples=32)
    first = launch_train([*base, "--max-steps", "2"], timeout=900)
    assert first.returncode == 0, first.stdout[-4000:]
    swapped = [f for f in glob.glob(str(nvme / "**" / "*"), recursive=True) if os.path.isfile(f)]
    assert swapped and sum(os.path.getsize(f) for f in swapped) > 0, "nothing was swapped to the NVMe path"
    second = launch_train([*base, "--resume", "latest"], timeout=900)
    assert second.returncode == 0, second.stdout[-4000:]
    assert "resumed" in second.stdout.lower() and "ZeRO-3" in second.stdout
    assert_export_matches_engine(str(tmp_path / "nvme"), str(tmp_path / "nvme" / "final.safetensors"))


def test_module_entry_point_and_console_script_parse_the_same_flags():
    """`python -m dsclip.train` and the installed `dsclip train` reach the same parser."""
    import shutil
    import sys

    from tests.launch import ROOT, run_process

    for cmd in ([sys.executable, "-m", "dsclip.train"], [shutil.which("dsclip") or "dsclip", "train"]):
        proc = run_process([*cmd, "--bogus-flag"], 120, cwd=ROOT)
        assert proc.returncode == 2, proc.stdout
        assert proc.stdout.strip().splitlines()[-1].startswith("dsclip: error: unrecognized arguments: --bogus-flag")
        help_text = run_process([*cmd, "--help"], 120, cwd=ROOT).stdout
        assert "--lock-image-unlocked-groups" in help_text and "--ds_config" in help_text
