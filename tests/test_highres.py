"""High-resolution fine-tuning end to end on 2 real ranks: a tiny model trained at 32 px is
fine-tuned at 48 px and at 32x48 under ZeRO-3 (built partitioned), with gradient checkpointing;
exports load in open_clip at the new size; resuming never interpolates again; the 32x48 export
(a non-square grid it records itself) is fine-tuned again at 48x32.  The same job fine-tunes the
base with the SigLIP loss, from SigLIP's logit init."""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from tests.launch import TINY, launch_many, tiny_args

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


@pytest.fixture(scope="module")
def finetune_runs(tmp_path_factory):
    """One 2-rank job: a 32 px base run, its 48 px and 32x48 fine-tunes, a resume of the latter, a
    48x32 fine-tune of that export, a SigLIP fine-tune of the base (all ZeRO-3, partitioned build),
    and a ZeRO-2 run with gradient checkpointing and a frozen tower."""
    root = tmp_path_factory.mktemp("highres")
    z3 = ["--ds_config", "ds_configs/zero3.json", *NO_EVAL]
    base = str(root / "base" / "final.safetensors")
    finetune = ["--pretrained", base, "--grad-checkpointing"]
    runs = {
        "base": tiny_args(str(root), "base", *z3, "--max-steps", "2"),
        "sq48": tiny_args(str(root), "sq48", *z3, *finetune, "--force-image-size", "48", "--max-steps", "4",
                          "--save-every-n-steps", "2"),
        "r32x48": tiny_args(str(root), "r32x48", *z3, *finetune, "--force-image-size", "32", "48",
                            "--max-steps", "4", "--save-every-n-steps", "2"),
        # weights come from the checkpoint, already at the new size
        "resume": tiny_args(str(root), "r32x48", *z3, *finetune, "--force-image-size", "32", "48",
                            "--max-steps", "6", "--resume", "latest"),
        # as many positions as 32x48: only the grid the export records tells them apart
        "r48x32": tiny_args(str(root), "r48x32", *z3, "--pretrained", str(root / "r32x48" / "final.safetensors"),
                            "--force-image-size", "48", "32", "--max-steps", "2"),
        "siglip": tiny_args(str(root), "siglip", *z3, "--pretrained", base, "--siglip", "--max-steps", "8"),
        "gc": tiny_args(str(root), "gc", "--ds_config", "ds_configs/zero2.json", "--grad-checkpointing",
                        "--lock-image", "--max-steps", "3", *NO_EVAL),
    }
    results, _ = launch_many(runs, nproc=2, timeout=900)
    return root, results


def test_finetune_at_higher_resolution_under_zero3(finetune_runs):
    root, results = finetune_runs
    assert results["base"].returncode == 0, results["base"].stdout[-3000:]
    for name, size, grid in (("sq48", ["48"], "4x4 -> 6x6"), ("r32x48", ["32", "48"], "4x4 -> 4x6")):
        proc = results[name]
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert "built partitioned" in proc.stdout and grid in proc.stdout
        hw = (int(size[0]), int(size[-1]))
        _export_matches(root / name, hw)

    proc = results["resume"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed step_00000004" in proc.stdout
    assert "positional_embedding" not in proc.stdout and "loaded pretrained" not in proc.stdout
    _export_matches(root / "r32x48", (32, 48))


def test_non_square_export_is_resized_from_its_recorded_grid(finetune_runs):
    root, results = finetune_runs
    proc = results["r48x32"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "visual.positional_embedding: grid 4x6 -> 6x4" in proc.stdout
    _export_matches(root / "r48x32", (48, 32))


def test_siglip_finetune_starts_from_siglip_init_and_learns(finetune_runs):
    root, results = finetune_runs
    proc = results["siglip"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "not a SigLIP checkpoint" in proc.stdout  # the base was trained with InfoNCE
    run_dir = root / "siglip"
    final = load_file(str(run_dir / "final.safetensors"))
    assert "logit_bias" in final
    # 8 Adam steps at lr <= 1e-3 from SigLIP's init, not from the base's logit_scale ln(100) and no bias
    assert abs(float(final["logit_bias"]) + 10.0) < 0.1 and abs(float(final["logit_scale"]) - math.log(10)) < 0.1
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("kind") == "train"]
    assert len(losses) >= 3 and losses[-1] < losses[0], losses
    # the export's .model.json rebuilds the model with its logit_bias in plain open_clip (strict keys)
    open_clip.add_model_config(str(run_dir / "final.model.json"))
    model = open_clip.create_model("final.model", pretrained=str(run_dir / "final.safetensors"))
    assert torch.equal(model.logit_bias.detach().reshape(()), final["logit_bias"].reshape(()))


def test_grad_checkpointing_under_zero2_with_a_frozen_tower(finetune_runs):
    root, results = finetune_runs
    assert results["gc"].returncode == 0, results["gc"].stdout[-3000:]
    assert (root / "gc" / "final.safetensors").exists()
