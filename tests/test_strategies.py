"""Freezing rules and parameter groups on tiny open_clip models.

open_clip's own ``lock`` methods serve as the oracle for group boundaries: for every unlocked
count our freezing must leave exactly the parameters trainable that open_clip's does.
"""

from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from torch import nn

from dsclip import strategies as S
from dsclip.config import Config, ConfigError
from tests.launch import TINY

with open(TINY) as _fh:
    TINY_CFG = json.load(_fh)


def _register(tmp_path, name: str, cfg: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    return name


def tiny_clip() -> nn.Module:
    open_clip.add_model_config(TINY)
    torch.manual_seed(0)
    return open_clip.create_model("tiny-clip")


def tiny_timm_clip(tmp_path, trunk: str = "test_resnet") -> nn.Module:
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": trunk, "timm_model_pretrained": False,
                                           "timm_pool": "avg" if trunk == "test_resnet" else "",
                                           "timm_proj": "linear"},
           "text_cfg": TINY_CFG["text_cfg"]}
    torch.manual_seed(0)
    return open_clip.create_model(_register(tmp_path, f"tiny-lit-{trunk}", cfg))


def tiny_resnet_clip(tmp_path) -> nn.Module:
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
           "text_cfg": TINY_CFG["text_cfg"]}
    return open_clip.create_model(_register(tmp_path, "tiny-rn-clip", cfg))


def tiny_hf_clip(tmp_path, arch: str = "roberta") -> nn.Module:
    """A CLIP with a 3-layer Hugging Face text encoder built from a local config (no download)."""
    transformers = pytest.importorskip("transformers")
    bert = tmp_path / f"tiny-{arch}"
    config_cls = {"roberta": transformers.RobertaConfig, "bert": transformers.BertConfig}[arch]
    config_cls(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=18).save_pretrained(bert)
    cfg = {"embed_dim": 32, "vision_cfg": TINY_CFG["vision_cfg"],
           "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "hf_model_pretrained": False, "context_length": 16}}
    # open_clip overrides hf_model_pretrained from its pretrained_text argument
    return open_clip.create_model(_register(tmp_path, f"tiny-hf-{arch}-clip", cfg), pretrained_text=False)


def cfg_for(strategy: str = "full", **fields) -> Config:
    cfg = Config()
    cfg.strategy.strategy = strategy
    for dotted, value in fields.items():
        sec, key = dotted.split("__")
        setattr(getattr(cfg, sec), key, value)
        cfg.explicit.add(f"{sec}.{key}")
    return cfg


def trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def all_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


# ------------------------------------------------------------------ layouts and group boundaries


def test_vit_and_text_layouts_follow_open_clip_groups():
    model = tiny_clip()
    lays = S.tower_layouts(model)
    img, txt = lays["image"], lays["text"]
    assert img.kind == "vit" and img.num_layers == 2
    assert img.groups[0] == ["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                             "visual.ln_pre.weight", "visual.ln_pre.bias"]
    assert all(n.startswith("visual.transformer.resblocks.0.") for n in img.groups[1])
    assert {n for n in img.groups[2] if not n.startswith("visual.transformer.resblocks.1.")} == \
        {"visual.ln_post.weight", "visual.ln_post.bias"}
    assert img.groups[3] == ["visual.proj"]
    assert txt.kind == "text-transformer" and len(txt.groups) == 4
    assert set(txt.groups[0]) == {"token_embedding.weight", "positional_embedding"}
    assert txt.groups[-1] == ["text_projection"]
    # every tower parameter has exactly one group; logit_scale belongs to no tower
    for lay in lays.values():
        flat = [n for g in lay.groups for n in g]
        assert len(flat) == len(set(flat)) == len(lay.layer_ids)
    assert "logit_scale" not in img.layer_ids and "logit_scale" not in txt.layer_ids


@pytest.mark.parametrize("unlocked", [0, 1, 2, 3, 4])
def test_lock_image_matches_open_clip(unlocked):
    ours, ref = tiny_clip(), tiny_clip()
    S.apply_strategy(ours, cfg_for("lock-image", strategy__lock_image_unlocked_groups=unlocked))
    ref.lock_image_tower(unlocked_groups=unlocked)
    assert trainable(ours) == trainable(ref)


@pytest.mark.parametrize("unlocked", [0, 1, 2, 3, 4])
def test_lock_text_with_frozen_layer_norm_matches_open_clip(unlocked):
    ours, ref = tiny_clip(), tiny_clip()
    S.apply_strategy(ours, cfg_for("lock-text", strategy__lock_text_unlocked_layers=unlocked,
                                   strategy__lock_text_freeze_layer_norm=True))
    ref.lock_text_tower(unlocked_layers=unlocked, freeze_layer_norm=True)
    assert trainable(ours) == trainable(ref)


def test_lock_text_without_freeze_layer_norm_keeps_layer_norms_training():
    # open_clip asserts here (its flag defaults to off); ours keeps LayerNorm of locked layers trainable
    model = tiny_clip()
    frozen = S.apply_strategy(model, cfg_for("lock-text"))
    lay = S.tower_layouts(model)["text"]
    text_names = set(lay.layer_ids)
    assert set(frozen) == text_names - lay.norm_params
    assert {n for n in trainable(model) if n in text_names} == lay.norm_params
    assert "ln_final.weight" in lay.norm_params and "transformer.resblocks.0.ln_1.bias" in lay.norm_params
    assert all(n.startswith("visual.") or n == "logit_scale" for n in trainable(model) - text_names)


def test_open_flags_compose_with_full_strategy():
    model = tiny_clip()
    frozen = S.apply_strategy(model, cfg_for("full", strategy__lock_image=True,
                                             strategy__lock_image_unlocked_groups=1))
    assert trainable(model) & set(S.tower_layouts(model)["image"].layer_ids) == {"visual.proj"}
    assert "visual.conv1.weight" in frozen and not any(n.startswith("transformer.") for n in frozen)


def test_partial_freezes_early_layers_of_both_towers():
    model, ref = tiny_clip(), tiny_clip()
    S.apply_strategy(model, cfg_for("partial", strategy__lock_text_freeze_layer_norm=True))
    ref.lock_image_tower(unlocked_groups=2)
    ref.lock_text_tower(unlocked_layers=2)
    assert trainable(model) == trainable(ref)
    # an explicit open_clip flag wins over the partial default
    model = tiny_clip()
    S.apply_strategy(model, cfg_for("partial", strategy__lock_image_unlocked_groups=3))
    image_trainable = trainable(model) & set(S.tower_layouts(model)["image"].layer_ids)
    assert any(n.startswith("visual.transformer.resblocks.0.") for n in image_trainable)
    assert "visual.conv1.weight" not in image_trainable


def test_partial_counts_come_from_partial_options():
    model = tiny_clip()
    cfg = cfg_for("partial", strategy__partial_unlocked_image_groups=1, strategy__partial_unlocked_text_layers=1,
                  strategy__lock_text_freeze_layer_norm=True)
    S.apply_strategy(model, cfg)
    assert trainable(model) == {"visual.proj", "text_projection", "logit_scale"}


def test_logit_scale_trains_unless_locked():
    model = tiny_clip()
    S.apply_strategy(model, cfg_for("lit", model__pretrained_image="x"))
    assert "logit_scale" in trainable(model)
    frozen = S.apply_strategy(model, cfg_for("lit", model__pretrained_image="x", strategy__lock_logit_scale=True))
    assert "logit_scale" in frozen and "logit_scale" not in trainable(model)


def test_apply_strategy_resets_previous_freezing():
    model = tiny_clip()
    S.apply_strategy(model, cfg_for("lock-image"))
    S.apply_strategy(model, cfg_for("full"))
    assert trainable(model) == all_names(model)


def test_too_many_unlocked_groups_is_a_config_error():
    with pytest.raises(ConfigError, match="4 lock groups"):
        S.apply_strategy(tiny_clip(), cfg_for("lock-image", strategy__lock_image_unlocked_groups=5))


# ------------------------------------------------------------------ other tower kinds


@pytest.mark.filterwarnings("ignore:Importing from timm.models.helpers:FutureWarning")  # open_clip's lock
@pytest.mark.parametrize("unlocked", [0, 1, 3])
def test_timm_tower_matches_open_clip(tmp_path, unlocked):
    ours, ref = tiny_timm_clip(tmp_path, "test_vit"), tiny_timm_clip(tmp_path, "test_vit")
    S.apply_strategy(ours, cfg_for("lit", model__pretrained_image="x", strategy__lock_image_unlocked_groups=unlocked))
    ref.lock_image_tower(unlocked_groups=unlocked)
    assert trainable(ours) == trainable(ref)
    assert "visual.head.proj.weight" in trainable(ours)  # the new projection head always trains


def test_freeze_bn_stats_survives_train_mode(tmp_path):
    model = tiny_timm_clip(tmp_path, "test_resnet")
    S.apply_strategy(model, cfg_for("lit", model__pretrained_image="x", strategy__lock_image_freeze_bn_stats=True))
    bns = [m for m in model.visual.trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    before = [bn.running_mean.clone() for bn in bns]
    model.train()
    model.encode_image(torch.randn(4, 3, 32, 32))
    model.train(True)
    model.encode_image(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, bns))
    assert all(int(bn.num_batches_tracked) == 0 for bn in bns)


def test_bn_stats_of_unlocked_groups_keep_updating(tmp_path):
    model = tiny_timm_clip(tmp_path, "test_resnet")
    S.apply_strategy(model, cfg_for("lit", model__pretrained_image="x", strategy__lock_image_unlocked_groups=1,
                                    strategy__lock_image_freeze_bn_stats=True))
    model.train()
    model.encode_image(torch.randn(4, 3, 32, 32))
    bns = {n: int(m.num_batches_tracked) for n, m in model.visual.trunk.named_modules()
           if isinstance(m, nn.BatchNorm2d)}
    assert {n for n, count in bns.items() if count} == {n for n in bns if n.startswith("layer4.")} != set()


def test_freeze_bn_stats_helper_on_its_own():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert S.freeze_bn_stats(net) == ["1"]
    net.train()
    net(torch.randn(2, 3, 8, 8))
    assert int(net[1].num_batches_tracked) == 0
    assert S.freeze_bn_stats(net) == ["1"]  # idempotent: one hook only
    assert len(net[1]._forward_pre_hooks) == 1


def test_modified_resnet_tower(tmp_path):
    model = tiny_resnet_clip(tmp_path)
    lay = S.tower_layouts(model)["image"]
    assert lay.kind == "resnet" and len(lay.groups) == 6
    S.apply_strategy(model, cfg_for("lock-image", strategy__lock_image_unlocked_groups=2,
                                    strategy__lock_image_freeze_bn_stats=True))
    image_trainable = trainable(model) & set(lay.layer_ids)
    assert image_trainable == set(lay.groups[-1]) | set(lay.groups[-2])
    model.train()
    model.encode_image(torch.randn(2, 3, 32, 32))
    assert int(model.visual.bn1.num_batches_tracked) == 0
    assert int(model.visual.layer4[0].bn1.num_batches_tracked) == 1


@pytest.mark.parametrize("unlocked", [0, 1, 2])
@pytest.mark.parametrize("freeze_ln", [True, False])
def test_hf_text_tower_matches_open_clip(tmp_path, unlocked, freeze_ln):
    ours, ref = tiny_hf_clip(tmp_path), tiny_hf_clip(tmp_path)
    lay = S.tower_layouts(ours)["text"]
    assert lay.kind == "hf" and lay.num_layers == 3 and len(lay.groups) == 4
    assert lay.always_trainable == {"text.proj.weight"}
    S.apply_strategy(ours, cfg_for("lock-text", strategy__lock_text_unlocked_layers=unlocked,
                                   strategy__lock_text_freeze_layer_norm=freeze_ln))
    ref.lock_text_tower(unlocked_layers=unlocked, freeze_layer_norm=freeze_ln)
    assert trainable(ours) == trainable(ref)


def test_hf_bert_tower_locks_where_open_clip_cannot(tmp_path):
    # open_clip's HFTextEncoder.lock raises KeyError for BERT (its arch table lacks layer_attr)
    model = tiny_hf_clip(tmp_path, "bert")
    S.apply_strategy(model, cfg_for("lock-text", strategy__lock_text_unlocked_layers=1,
                                    strategy__lock_text_freeze_layer_norm=True))
    text_trainable = {n for n in trainable(model) if n.startswith("text.")}
    assert text_trainable and all(n.startswith(("text.transformer.encoder.layer.2.", "text.proj")) for n in
                                  text_trainable)


def test_hf_text_tower_partial_and_layer_decay(tmp_path):
    model = tiny_hf_clip(tmp_path)
    cfg = cfg_for("partial", strategy__partial_unlocked_text_layers=1, optim__text_layer_decay=0.5,
                  optim__lr=1.0, strategy__lock_text_freeze_layer_norm=True)
    S.apply_strategy(model, cfg)
    text_trainable = {n for n in trainable(model) if n.startswith("text.")}
    assert text_trainable and all(n.startswith(("text.transformer.encoder.layer.2.", "text.proj")) for n in text_trainable)
    lrs = _lr_by_name(model, S.param_groups_for(model, cfg))
    assert lrs["text.proj.weight"] == 1.0
    assert lrs["text.transformer.encoder.layer.2.output.dense.weight"] == 0.5  # layer 3 of L=3 -> 0.5^(4-3)


# ------------------------------------------------------------------ parameter groups


def _lr_by_name(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: g["lr"] for g in groups for p in g["params"]}


def _wd_by_name(model, groups):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return {name_of[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}


def test_groups_hold_each_trainable_param_once_and_no_frozen_ones():
    model = tiny_clip()
    cfg = cfg_for("partial", optim__image_layer_decay=0.7, optim__text_layer_decay=0.8)
    frozen = S.apply_strategy(model, cfg)
    groups = S.param_groups_for(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert {id(p) for p in model.parameters() if p.requires_grad} == set(ids)
    assert not set(frozen) & set(_lr_by_name(model, groups))
    assert all(g["params"] for g in groups)
    for g in groups:
        assert set(g) >= {"params", "lr", "weight_decay", "name", "tower", "lr_scale"}
        assert g["tower"] in ("image", "text", "other")
    assert len({g["name"] for g in groups}) == len(groups)


def test_no_weight_decay_rules():
    model = tiny_clip()
    cfg = cfg_for("full", optim__wd=0.1)
    S.apply_strategy(model, cfg)
    wd = _wd_by_name(model, S.param_groups_for(model, cfg))
    for name in ("logit_scale", "positional_embedding", "visual.positional_embedding", "visual.class_embedding",
                 "visual.ln_pre.weight", "visual.ln_post.bias", "ln_final.weight",
                 "transformer.resblocks.0.attn.in_proj_bias", "visual.transformer.resblocks.1.mlp.c_fc.bias"):
        assert wd[name] == 0.0, name
    for name in ("visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight",
                 "transformer.resblocks.1.attn.in_proj_weight", "visual.transformer.resblocks.0.mlp.c_proj.weight"):
        assert wd[name] == 0.1, name


def test_wd_exclude_globs():
    model = tiny_clip()
    cfg = cfg_for("full", optim__wd=0.1, optim__wd_exclude=["*token_embedding*", "visual.proj"])
    wd = _wd_by_name(model, S.param_groups_for(model, cfg))
    assert wd["token_embedding.weight"] == 0.0 and wd["visual.proj"] == 0.0
    assert wd["text_projection"] == 0.1


def test_model_no_weight_decay_lists_are_honoured(tmp_path):
    model = tiny_timm_clip(tmp_path, "test_vit")
    names = S.no_decay_names(model)
    assert {"visual.trunk.pos_embed", "visual.trunk.cls_token"} <= names  # from the timm trunk's own list
    model.extra = nn.Linear(3, 3)
    model.no_weight_decay = lambda: {"extra.weight"}
    assert "extra.weight" in S.no_decay_names(model)


def test_tower_lr_and_wd():
    model = tiny_clip()
    cfg = cfg_for("full", optim__lr=1e-3, optim__image_lr=2e-4, optim__text_lr=3e-4, optim__wd=0.1,
                  optim__image_wd=0.05, optim__text_wd=0.3)
    groups = S.param_groups_for(model, cfg)
    lr, wd = _lr_by_name(model, groups), _wd_by_name(model, groups)
    assert lr["visual.conv1.weight"] == 2e-4 and wd["visual.conv1.weight"] == 0.05
    assert lr["token_embedding.weight"] == 3e-4 and wd["token_embedding.weight"] == 0.3
    assert lr["logit_scale"] == 1e-3 and wd["logit_scale"] == 0.0
    assert len(groups) == 5  # image decay/no-decay, text decay/no-decay, other no-decay


def test_layer_decay_lrs():
    model = tiny_clip()  # 2 blocks per tower: layer ids 0..3, lr_scale = d^(3 - id)
    cfg = cfg_for("full", optim__lr=1.0, optim__image_layer_decay=0.5, optim__text_layer_decay=0.1)
    lr = _lr_by_name(model, S.param_groups_for(model, cfg))
    assert lr["visual.conv1.weight"] == pytest.approx(0.125)
    assert lr["visual.class_embedding"] == pytest.approx(0.125)
    assert lr["visual.transformer.resblocks.0.attn.in_proj_weight"] == pytest.approx(0.25)
    assert lr["visual.transformer.resblocks.1.ln_2.bias"] == pytest.approx(0.5)
    assert lr["visual.ln_post.weight"] == lr["visual.proj"] == 1.0
    assert lr["token_embedding.weight"] == pytest.approx(1e-3)
    assert lr["transformer.resblocks.1.mlp.c_fc.weight"] == pytest.approx(0.1)
    assert lr["text_projection"] == lr["ln_final.bias"] == lr["logit_scale"] == 1.0


def test_groups_under_a_frozen_tower_with_layer_decay():
    model = tiny_clip()
    cfg = cfg_for("lock-image", optim__lr=1.0, optim__image_layer_decay=0.5)
    S.apply_strategy(model, cfg)
    groups = S.param_groups_for(model, cfg)
    assert {g["tower"] for g in groups} == {"text", "other"}


def test_bad_layer_decay_is_a_config_error():
    with pytest.raises(ConfigError, match="image-layer-decay"):
        S.param_groups_for(tiny_clip(), cfg_for("full", optim__image_layer_decay=1.5))


def test_zero3_placeholder_shapes_are_respected():
    # Under deepspeed.zero.Init parameters hold a [0] placeholder and the real shape in ds_shape.
    model = tiny_clip()
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    wd = _wd_by_name(model, S.param_groups_for(model, cfg_for("full", optim__wd=0.1)))
    assert wd["visual.conv1.weight"] == 0.1 and wd["visual.ln_pre.weight"] == 0.0
    rows = S.describe_param_groups(model, S.param_groups_for(model, cfg_for("full")), [])
    assert sum(r["params"] for r in rows) == sum(p.ds_numel for p in model.parameters())


# ------------------------------------------------------------------ defaults and reporting


@pytest.mark.parametrize("strategy,lr,warmup,epochs", [
    ("full", 1e-5, 1000, 5), ("partial", 5e-5, 1000, 5), ("lock-image", 1e-4, 1000, 10),
    ("lock-text", 1e-4, 1000, 10), ("lit", 1e-4, 1000, 10)])
def test_strategy_defaults(strategy, lr, warmup, epochs):
    cfg = cfg_for(strategy, model__pretrained_image="x")
    lines = S.apply_strategy_defaults(cfg)
    assert (cfg.optim.lr, cfg.optim.warmup, cfg.optim.epochs) == (lr, warmup, epochs)
    assert len(lines) == 3 and all(strategy in line for line in lines)


def test_explicit_flags_win_over_strategy_defaults():
    cfg = cfg_for("lock-image", optim__lr=3e-3, optim__epochs=2)
    lines = S.apply_strategy_defaults(cfg)
    assert (cfg.optim.lr, cfg.optim.warmup, cfg.optim.epochs) == (3e-3, 1000, 2)
    assert len(lines) == 1 and "warmup" in lines[0]


def test_lit_needs_image_weights():
    with pytest.raises(ConfigError, match="pretrained-image"):
        S.apply_strategy_defaults(cfg_for("lit"))


def test_describe_and_format_param_groups():
    model = tiny_clip()
    cfg = cfg_for("partial", optim__image_layer_decay=0.5)
    S.apply_strategy_defaults(cfg)
    frozen = S.apply_strategy(model, cfg)
    groups = S.param_groups_for(model, cfg)
    rows = S.describe_param_groups(model, groups, frozen)
    json.dumps(rows)  # param_groups.json
    frozen_rows = [r for r in rows if r["frozen"]]
    assert {r["tower"] for r in frozen_rows} == {"image", "text"}
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    assert sum(r["tensors"] for r in frozen_rows) == len(frozen)
    assert [r["group"] for r in rows if not r["frozen"]] == [g["name"] for g in groups]
    img_top = next(r for r in rows if r["group"] == "image_L03_decay")
    assert img_top["layers"] == "3" and math.isclose(img_top["lr"], 5e-5)
    table = S.format_param_group_table(rows)
    assert "image_frozen" in table and "trainable" in table.splitlines()[-1]
    assert len(table.splitlines()) == len(rows) + 3


@pytest.mark.parametrize("flags,needle", [
    (["--lock-text-unlocked-layers", "2"], "--lock-text"),
    (["--strategy", "lock-image", "--lock-text-unlocked-layers", "2"], "--lock-text"),
    (["--lock-image-unlocked-groups", "1"], "--lock-image"),
])
def test_unlocked_counts_on_an_unlocked_tower_are_an_error(flags, needle):
    """open_clip silently ignores them without the lock; dsclip says so instead of training the tower."""
    from dsclip.config import parse_args

    with pytest.raises(ConfigError, match=needle):
        S.apply_strategy(tiny_clip(), parse_args(flags))
    S.apply_strategy(tiny_clip(), parse_args([*flags, needle]))  # with the lock it is what it says
