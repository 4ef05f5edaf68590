"""High-resolution fine-tuning end to end on 2 real ranks: a tiny model trained at 32 px is
fine-tuned at 48 px and at 32x48 under ZeRO-3 (built partitioned), with gradient checkpointing;
exports load in open_clip at the new size; resuming never interpolates again."""

from __future__ import annotations

import open_clip
import pytest
import torch

from tests.launch import TINY, launch_train, tiny_args

pytestmark = pytest.mark.dist

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval"]


def _export_matches(run_dir, size) -> None:
    probe = torch.load(run_dir / "export_check.pt", weights_only=True)
    assert tuple(probe["image"].shape[-2:]) == size
    open_clip.add_model_config(TINY)
    model = open_clip.create_model("tiny-clip", pretrained=str(run_dir / "final.safetensors"),
                                   force_image_size=size, output_dict=True).eval()
    with torch.no_grad():
        out = model(image=probe["image"], text=probe["text"])
    assert (out["image_features"] - probe["image_features"]).abs().max() < 1e-5


def test_finetune_at_higher_resolution_under_zero3(tmp_path):
    z3 = ["--ds_config", "ds_configs/zero3.json", *NO_EVAL]
    proc = launch_train(tiny_args(str(tmp_path), "base", *z3, "--max-steps", "2"))
    assert proc.returncode == 0, proc.stdout[-3000:]
    base = str(tmp_path / "base" / "final.safetensors")

    for name, size, grid in (("sq48", ["48"], "4x4 -> 6x6"), ("r32x48", ["32", "48"], "4x4 -> 4x6")):
        args = tiny_args(str(tmp_path), name, *z3, "--pretrained", base, "--force-image-size", *size,
                         "--grad-checkpointing", "--max-steps", "4", "--save-every-n-steps", "2")
        proc = launch_train(args)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert "built partitioned" in proc.stdout and grid in proc.stdout
        hw = (int(size[0]), int(size[-1]))
        _export_matches(tmp_path / name, hw)

    # resume the 32x48 run: weights come from its checkpoint, already at the new size
    args = tiny_args(str(tmp_path), "r32x48", *z3, "--pretrained", base, "--force-image-size", "32", "48",
                     "--grad-checkpointing", "--max-steps", "6", "--resume", "latest")
    proc = launch_train(args)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed step_00000004" in proc.stdout
    assert "positional_embedding" not in proc.stdout and "loaded pretrained" not in proc.stdout
    _export_matches(tmp_path / "r32x48", (32, 48))


def test_grad_checkpointing_under_zero2_with_a_frozen_tower(tmp_path):
    args = tiny_args(str(tmp_path), "gc", "--ds_config", "ds_configs/zero2.json", "--grad-checkpointing",
                     "--lock-image", "--max-steps", "3", *NO_EVAL)
    proc = launch_train(args)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert (tmp_path / "gc" / "final.safetensors").exists()
