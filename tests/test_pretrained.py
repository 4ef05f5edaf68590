"""Every pretrained source: tags (offline), local files, training checkpoints, DeepSpeed
directories, local-dir/hf-hub, LiT image weights, and the unsafe-pickle refusal."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from dsclip import pretrained as P
from dsclip.config import ConfigError
from tests.launch import ROOT, TINY, cpu_env, free_port, run_process

with open(TINY) as _fh:
    TINY_CFG = json.load(_fh)


def tiny_model(seed: int = 0):
    open_clip.add_model_config(TINY)
    torch.manual_seed(seed)
    return open_clip.create_model("tiny-clip")


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        assert torch.equal(v.reshape(b[k].shape), b[k]), k


class _MarksPickled:
    """A pickled object that would run ``touch`` when unpickled."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class Harmless:
    pass


@pytest.fixture()
def tiny_sd():
    return tiny_model().state_dict()


# ------------------------------------------------------------------ local files


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_plain_torch_state_dict(tmp_path, tiny_sd, suffix):
    path = tmp_path / f"w{suffix}"
    torch.save(tiny_sd, path)
    assert_same(P.load_pretrained_state_dict(str(path), "tiny-clip"), tiny_sd)


def test_safetensors_export(tmp_path, tiny_sd):
    path = tmp_path / "final.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_sd.items()}, str(path))
    sd = P.load_pretrained_state_dict(str(path), "tiny-clip")
    assert_same(sd, tiny_sd)
    P.check_state_dict(tiny_model(), sd)


def test_open_clip_training_checkpoint_with_module_prefix(tmp_path, tiny_sd):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    ckpt = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in tiny_sd.items()},
            "optimizer": opt.state_dict()}
    path = tmp_path / "epoch_3.pt"
    torch.save(ckpt, path)
    assert_same(P.load_pretrained_state_dict(str(path), "tiny-clip"), tiny_sd)


def test_directory_with_weights_file(tmp_path, tiny_sd):
    torch.save(tiny_sd, tmp_path / "pytorch_model.bin")
    assert_same(P.load_pretrained_state_dict(str(tmp_path), "tiny-clip"), tiny_sd)


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        P.load_pretrained_state_dict(str(tmp_path / "nope.pt"), "tiny-clip")
    with pytest.raises(ConfigError, match="neither a DeepSpeed checkpoint nor a weights file"):
        P.load_pretrained_state_dict(str(tmp_path), "tiny-clip")


def test_garbage_file_is_a_config_error(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        P.load_pretrained_state_dict(str(path), "tiny-clip")
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match="safetensors"):
        P.load_pretrained_state_dict(str(bad), "tiny-clip")


def test_strip_wrapper_prefix():
    t = torch.zeros(1)
    assert P.strip_wrapper_prefix({"module._orig_mod.a": t, "module._orig_mod.b": t}) == {"a": t, "b": t}
    assert P.strip_wrapper_prefix({"module.a": t, "b": t}) == {"module.a": t, "b": t}


# ------------------------------------------------------------------ unsafe pickles


@pytest.mark.parametrize("zip_format", [True, False])
def test_code_running_pickle_is_refused(tmp_path, tiny_sd, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_sd, "extra": _MarksPickled(str(marker))}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ConfigError, match="trust-checkpoint"):
        P.load_pretrained_state_dict(str(path), "tiny-clip")
    assert not marker.exists()


def test_trust_allows_arbitrary_objects(tmp_path, tiny_sd):
    path = tmp_path / "with_object.pt"
    torch.save({"state_dict": tiny_sd, "args": Harmless()}, path)
    with pytest.raises(ConfigError, match="Harmless"):
        P.load_pretrained_state_dict(str(path), "tiny-clip")
    assert_same(P.load_pretrained_state_dict(str(path), "tiny-clip", trust=True), tiny_sd)


# ------------------------------------------------------------------ key checks


def test_check_state_dict_lists_every_problem(tiny_sd):
    sd = dict(tiny_sd)
    del sd["visual.proj"]
    sd["visual.extra_head"] = torch.zeros(3)
    sd["text_projection"] = torch.zeros(5, 5)
    with pytest.raises(ConfigError) as err:
        P.check_state_dict(tiny_model(), sd)
    msg = str(err.value)
    assert "1 missing: visual.proj" in msg and "1 unexpected: visual.extra_head" in msg
    assert "1 mis-shaped: text_projection [5, 5] vs model [32, 32]" in msg
    assert "\n" not in msg


def test_check_state_dict_allows_pos_embed_resize_and_scalar_shapes(tiny_sd):
    sd = dict(tiny_sd)
    sd["visual.positional_embedding"] = torch.zeros(50, 64)  # another image size: resized later
    sd["logit_scale"] = sd["logit_scale"].reshape(1)  # DeepSpeed-safe [1] vs open_clip's []
    P.check_state_dict(tiny_model(), sd)
    with pytest.raises(ConfigError, match="positional_embedding"):
        P.check_state_dict(tiny_model(), sd, allow_pos_embed_mismatch=False)


def test_standard_checkpoint_into_custom_text_model(tmp_path, tiny_sd):
    cfg = dict(TINY_CFG, custom_text=True)
    path = tmp_path / "tiny-custom-text.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    model = open_clip.create_model("tiny-custom-text")
    torch.save(tiny_sd, tmp_path / "w.pt")
    sd = P.load_pretrained_state_dict(str(tmp_path / "w.pt"), "tiny-custom-text")
    assert "text.token_embedding.weight" in sd
    P.check_state_dict(model, sd)


# ------------------------------------------------------------------ tags


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network and an empty cache, whatever the machine has."""
    from huggingface_hub import constants

    monkeypatch.setattr(P, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path))


def test_tag_offline_is_a_clear_error(offline):
    with pytest.raises(ConfigError) as err:
        P.load_pretrained_state_dict("laion2b_s34b_b79k", "ViT-B-32")
    msg = str(err.value)
    assert "offline" in msg and "valid tags for ViT-B-32" in msg and "openai" in msg


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(ConfigError, match="unknown pretrained tag 'laion9b'.*laion2b_s34b_b79k"):
        P.load_pretrained_state_dict("laion9b", "ViT-B-32")
    with pytest.raises(ConfigError, match="has no open_clip pretrained tags"):
        P.load_pretrained_state_dict("laion2b_s34b_b79k", "tiny-clip")


# ------------------------------------------------------------------ local-dir and hf-hub


def test_local_dir_source(tmp_path, tiny_sd):
    root = tmp_path / "my-clip"
    root.mkdir()
    (root / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in tiny_sd.items()}, str(root / "open_clip_model.safetensors"))
    cfg_path, weights = P.resolve_model_source(f"local-dir:{root}")
    assert weights == str(root / "open_clip_model.safetensors")
    open_clip.add_model_config(cfg_path)
    model = open_clip.create_model(os.path.splitext(os.path.basename(cfg_path))[0])
    sd = P.load_pretrained_state_dict(weights, "")
    P.check_state_dict(model, sd)
    model.load_state_dict(sd)
    assert P.resolve_model_source("ViT-B-32") == ("ViT-B-32", None)


def test_local_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="directory not found"):
        P.resolve_model_source(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        P.resolve_model_source(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(ConfigError, match="model_cfg"):
        P.resolve_model_source(f"local-dir:{tmp_path}")


def test_hf_hub_offline_is_a_clear_error(offline):
    with pytest.raises(ConfigError, match="cannot be reached.*local-dir"):
        P.resolve_model_source("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


# ------------------------------------------------------------------ LiT image weights


def _lit_model(tmp_path, trunk="test_resnet"):
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "timm_model_name": trunk, "timm_model_pretrained": False,
                                           "timm_pool": "avg", "timm_proj": "linear"},
           "text_cfg": TINY_CFG["text_cfg"]}
    path = tmp_path / f"tiny-lit-{trunk}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    return open_clip.create_model(f"tiny-lit-{trunk}")


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "wrapped"])
def test_lit_loads_local_timm_checkpoint(tmp_path, fmt):
    import timm

    torch.manual_seed(1)
    imagenet = timm.create_model("test_resnet", num_classes=10)  # with its classifier, as released
    sd = imagenet.state_dict()
    path = tmp_path / f"in1k.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "wrapped":
        torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        torch.save(sd, path)
    model = _lit_model(tmp_path)
    head_before = model.visual.head.proj.weight.clone()
    notes = P.load_pretrained_image(model, str(path))
    assert "dropped classifier fc.bias, fc.weight" in notes[0]
    trunk_sd = model.visual.trunk.state_dict()
    for k, v in trunk_sd.items():
        assert torch.equal(v, sd[k]), k
    assert torch.equal(model.visual.head.proj.weight, head_before)


def test_lit_checkpoint_for_another_trunk_is_refused(tmp_path):
    import timm

    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit the timm trunk"):
        P.load_pretrained_image(_lit_model(tmp_path), str(path))


def test_lit_timm_name_offline_and_unknown(tmp_path, offline):
    model = _lit_model(tmp_path)
    with pytest.raises(ConfigError, match="offline.*local timm checkpoint"):
        P.load_pretrained_image(model, "resnet18.a1_in1k")
    with pytest.raises(ConfigError, match="unknown timm model"):
        P.load_pretrained_image(model, "no_such_net_xyz")


def test_lit_needs_a_timm_tower(tmp_path):
    with pytest.raises(ConfigError, match="timm"):
        P.load_pretrained_image(tiny_model(), "resnet18")


# ------------------------------------------------------------------ DeepSpeed checkpoint directories

_DS_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, deepspeed, open_clip
    from safetensors.torch import save_file
    from dsclip.config import Config
    from dsclip.strategies import apply_strategy, param_groups_for
    out, stage = sys.argv[1], int(sys.argv[2])
    open_clip.add_model_config({tiny!r})
    torch.manual_seed(0)
    m = open_clip.create_model("tiny-clip")
    m.logit_scale = torch.nn.Parameter(m.logit_scale.data.reshape(1))  # DeepSpeed cannot broadcast 0-dim
    cfg = Config(); cfg.strategy.strategy = "lock-image"; cfg.optim.lr = 1e-2; cfg.optim.text_layer_decay = 0.5
    apply_strategy(m, cfg)
    groups = param_groups_for(m, cfg)
    ds = {{"train_micro_batch_size_per_gpu": 2, "optimizer": {{"type": "AdamW", "params": {{"lr": 1e-2}}}},
          "zero_optimization": {{"stage": stage}}}}
    engine, opt, _, _ = deepspeed.initialize(model=m, model_parameters=groups, config=ds)
    kept = [(g["name"], g["tower"], g["lr_scale"], g["lr"]) for g in opt.param_groups]
    assert kept == [(g["name"], g["tower"], g["lr_scale"], g["lr"]) for g in groups], kept
    out_ = engine(torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, 16)))
    img, txt, scale = out_
    loss = (img @ txt.T * scale).logsumexp(-1).mean()
    engine.backward(loss); engine.step()
    engine.save_checkpoint(os.path.join(out, "ckpt"), tag="good")
    save_file({{k: v.detach().contiguous() for k, v in m.state_dict().items()}}, os.path.join(out, "ref.safetensors"))

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + os.path.join(out, "pwned"),))
    engine.save_checkpoint(os.path.join(out, "evil"), tag="t", client_state={{"x": Payload()}})
""")


@pytest.fixture(scope="module")
def ds_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds")
    script = out / "make.py"
    script.write_text(_DS_SCRIPT.format(tiny=TINY))
    env = cpu_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")
    proc = run_process([sys.executable, str(script), str(out), "2"], 300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out


@pytest.mark.parametrize("which", ["root", "tag"])
def test_deepspeed_checkpoint_dir(ds_checkpoint, which):
    from safetensors.torch import load_file

    path = ds_checkpoint / "ckpt" if which == "root" else ds_checkpoint / "ckpt" / "good"
    assert P.is_deepspeed_checkpoint(str(path))
    sd = P.load_pretrained_state_dict(str(path), "tiny-clip")
    ref = load_file(str(ds_checkpoint / "ref.safetensors"))
    assert set(sd) == {k for k, v in tiny_model().named_parameters()}
    for k, v in sd.items():
        assert torch.equal(v.reshape(ref[k].shape), ref[k]), k
    P.check_state_dict(tiny_model(), sd)


def test_deepspeed_checkpoint_with_code_running_client_state_is_refused(ds_checkpoint):
    with pytest.raises(ConfigError, match="posix.system.*trust-checkpoint"):
        P.load_pretrained_state_dict(str(ds_checkpoint / "evil"), "tiny-clip")
    assert not (ds_checkpoint / "pwned").exists()
