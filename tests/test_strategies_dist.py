"""Each strategy for a few real 2-rank steps under ZeRO-2 and ZeRO-3.

The run starts from weights the test wrote, so the exported ``final.safetensors`` can be checked
tensor by tensor: frozen parameters are bit-identical to the start, every trainable parameter has
moved, and ``param_groups.json`` agrees with the strategy computed here.  LiT's trunk starts from
a timm checkpoint unlike the --pretrained weights, so the export shows it was loaded.
"""

from __future__ import annotations

import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsclip import strategies as S
from dsclip.config import parse_args
from tests.launch import TINY, launch_many, tiny_args

pytestmark = pytest.mark.dist

with open(TINY) as _fh:
    TINY_CFG = json.load(_fh)

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval"]
# 2 ranks x batch 4 x 2 steps: enough for Adam to move every trainable tensor
SHORT = ["--train-num-samples", "16", "--max-steps", "2", "--save-frequency", "0", "--dump-param-groups", *NO_EVAL]

STRATEGIES = {
    "full": ["--image-layer-decay", "0.5"],
    "lock-image": ["--lock-image-unlocked-groups", "1"],
    "lock-text": [],  # LayerNorms of the locked text tower keep training (no --lock-text-freeze-layer-norm)
    "partial": ["--partial-unlocked-image-groups", "2", "--partial-unlocked-text-layers", "1",
                "--lock-logit-scale"],
    "lit": ["--lock-image-freeze-bn-stats"],
}


def _lit_model_config(tmp_path) -> str:
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": "test_resnet",
                                           "timm_model_pretrained": False, "timm_pool": "avg",
                                           "timm_proj": "linear"},
           "text_cfg": TINY_CFG["text_cfg"]}
    path = tmp_path / "tiny-lit.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _imagenet_trunk(path) -> dict[str, torch.Tensor]:
    """A timm ImageNet checkpoint as released (with its classifier), unlike the --pretrained start
    weights in every tensor, BatchNorm statistics included.  Returns the trunk's share, keyed as
    in the CLIP model."""
    import timm

    torch.manual_seed(4321)
    net = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():  # a trained net: BatchNorm affine and statistics away from their init too
        for name, t in [*net.named_parameters(), *net.named_buffers()]:
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    sd = net.state_dict()
    torch.save(sd, path)
    return {f"visual.trunk.{k}": v.clone() for k, v in sd.items() if not k.startswith("fc.")}


def _start_weights(tmp_path, model_json: str) -> tuple[str, dict[str, torch.Tensor], str | None]:
    """Random start weights on disk, plus (for LiT) another trunk as a timm checkpoint.  The
    returned weights are what the run starts from: the trunk's come from the timm checkpoint,
    loaded after --pretrained."""
    open_clip.add_model_config(model_json)
    torch.manual_seed(1234)
    model = open_clip.create_model(os.path.splitext(os.path.basename(model_json))[0])
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    start = tmp_path / "start.safetensors"
    save_file(sd, str(start))
    trunk_ckpt = None
    if hasattr(model.visual, "trunk"):
        trunk_ckpt = str(tmp_path / "trunk_in1k.pth")
        trunk = _imagenet_trunk(trunk_ckpt)
        assert trunk.keys() == {k for k in sd if k.startswith("visual.trunk.")}
        assert not [k for k, v in trunk.items() if v.is_floating_point() and torch.equal(v, sd[k])]
        sd.update(trunk)
    return str(start), sd, trunk_ckpt


def _strategy_run(root, strategy: str, stage: str) -> tuple[list[str], str, dict[str, torch.Tensor]]:
    """(train args, model json, start weights) of one strategy's run under ``root``."""
    folder = root / strategy
    folder.mkdir()
    model_json = _lit_model_config(folder) if strategy == "lit" else TINY
    start, start_sd, trunk_ckpt = _start_weights(folder, model_json)
    extra = ["--strategy", strategy, *STRATEGIES[strategy], "--pretrained", start]
    if trunk_ckpt:
        extra += ["--pretrained-image", trunk_ckpt]
    args = tiny_args(str(folder), "run", "--ds_config", f"ds_configs/{stage}.json", *SHORT, *extra)
    args[args.index("--model") + 1] = model_json
    return args, model_json, start_sd


@pytest.fixture(scope="module", params=["zero2", "zero3"])
def strategy_runs(request, tmp_path_factory):
    """Every strategy's run under one ZeRO stage, each a 2-rank job."""
    stage = request.param
    root = tmp_path_factory.mktemp(stage)
    runs = {s: _strategy_run(root, s, stage) for s in STRATEGIES}
    results, _ = launch_many({s: r[0] for s, r in runs.items()}, nproc=2, timeout=900)
    return root, runs, results


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_trains_only_what_it_should(strategy_runs, strategy):
    root, runs, results = strategy_runs
    args, model_json, start_sd = runs[strategy]
    assert results[strategy].returncode == 0, results[strategy].stdout[-4000:]
    run_dir = root / strategy / "run"

    # what the strategy should freeze, computed here on a fresh copy of the model
    cfg = parse_args(args)
    S.apply_strategy_defaults(cfg)
    open_clip.add_model_config(model_json)
    ref = open_clip.create_model(os.path.splitext(os.path.basename(model_json))[0])
    expected_frozen = set(S.apply_strategy(ref, cfg))
    expected_trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert expected_frozen and expected_trainable or strategy == "full"

    with open(run_dir / "param_groups.json") as fh:
        rows = json.load(fh)
    frozen = {n for r in rows if r["frozen"] for n in r["names"]}
    trainable = {n for r in rows if not r["frozen"] for n in r["names"]}
    assert frozen == expected_frozen and trainable == expected_trainable
    assert all(r["tensors"] > 0 for r in rows)

    final = load_file(str(run_dir / "final.safetensors"))
    unchanged = [n for n in trainable if torch.equal(final[n].reshape(start_sd[n].shape), start_sd[n])]
    assert not unchanged, f"trainable but unchanged: {unchanged}"
    moved = [n for n in frozen if not torch.equal(final[n].reshape(start_sd[n].shape), start_sd[n])]
    assert not moved, f"frozen but changed: {moved}"

    if strategy == "lit":  # the locked trunk is the timm checkpoint's, BatchNorm statistics too
        trunk = [k for k in start_sd if k.startswith("visual.trunk.")]
        assert trunk and all(torch.equal(final[k], start_sd[k]) for k in trunk)
        assert any("loaded image-tower weights" in line and "dropped classifier fc.bias, fc.weight" in line
                   for line in results[strategy].stdout.splitlines())
    if strategy == "full":
        lrs = {r["group"]: r["lr"] for r in rows}
        assert lrs["image_L00_decay"] == pytest.approx(1e-3 * 0.5 ** 3)
