"""Every shipped template loads with dsclip's own loader and names things that exist."""

from __future__ import annotations

import glob
import os

import open_clip
import pytest
import timm

from dsclip import strategies as S
from dsclip.config import Config, ConfigError, load_yaml, parse_args
from tests.launch import TINY

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dsclip", "templates")
EXPECTED = {"quick", "production", "conservative", "domain_adaptation", "lit", "multilingual", "high_resolution",
            "wiseft"}
TEMPLATES = sorted(glob.glob(os.path.join(TEMPLATE_DIR, "*.yaml")))


def _load(path: str) -> Config:
    cfg = Config()
    load_yaml(path, cfg)
    return cfg


def test_every_guide_template_is_shipped():
    assert {os.path.splitext(os.path.basename(p))[0] for p in TEMPLATES} == EXPECTED


@pytest.mark.parametrize("path", TEMPLATES, ids=os.path.basename)
def test_template_validates(path):
    cfg = _load(path)
    from dsclip.train import validate

    if cfg.eval.wise_ft_alphas:  # the sweep needs the evaluation data the user passes with the template
        with pytest.raises(ConfigError, match="--zeroshot-data"):
            validate(cfg)
        cfg.eval.zeroshot_data = f"general={TEMPLATE_DIR}"
    validate(cfg)
    assert cfg.is_set("strategy.strategy")
    m = cfg.model
    assert m.model in open_clip.list_models()
    if m.pretrained:
        assert m.pretrained in open_clip.list_pretrained_tags_by_model(m.model)
    if m.pretrained_image:
        assert m.pretrained_image in timm.list_pretrained()
    S.apply_strategy_defaults(cfg)
    assert cfg.optim.lr and cfg.optim.warmup is not None and cfg.optim.epochs
    if cfg.eval.keep_best:
        from dsclip.guards import parse_keep_best

        name, _ = parse_keep_best(cfg.eval.keep_best)
        assert name.startswith(("val/", "zeroshot/"))


@pytest.mark.parametrize("path", TEMPLATES, ids=os.path.basename)
def test_flags_override_template(path):
    cfg = parse_args(["--config", path, "--lr", "0.5", "--model", TINY])
    assert cfg.optim.lr == 0.5 and cfg.model.model == TINY
    assert cfg.strategy.strategy == _load(path).strategy.strategy


@pytest.mark.parametrize("path", [p for p in TEMPLATES if "lit" not in os.path.basename(p)], ids=os.path.basename)
def test_template_strategy_builds_groups_on_tiny_model(path):
    cfg = _load(path)
    S.apply_strategy_defaults(cfg)
    open_clip.add_model_config(TINY)
    model = open_clip.create_model("tiny-clip")
    frozen = S.apply_strategy(model, cfg)
    groups = S.param_groups_for(model, cfg)
    assert groups and all(g["params"] for g in groups)
    assert sum(len(g["params"]) for g in groups) + len(frozen) == len(list(model.parameters()))


def test_lit_template_uses_a_timm_image_tower():
    cfg = _load(os.path.join(TEMPLATE_DIR, "lit.yaml"))
    vision = open_clip.get_model_config(cfg.model.model)["vision_cfg"]
    assert vision["timm_model_name"] == cfg.model.pretrained_image.split(".")[0]
    assert cfg.strategy.strategy == "lit" and not cfg.model.pretrained
