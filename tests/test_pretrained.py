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


# ------------------------------------------------------------------ local-dir, hf-hub and tags through a filled cache

HALF = (0.5, 0.5, 0.5)  # not open_clip's default mean/std: shows the repo's preprocess_cfg is used


def save_repo(root, seed: int = 3, misshape: str | None = None) -> dict[str, torch.Tensor]:
    """An open_clip repo as open_clip's hub code writes it: open_clip_config.json
    (``save_config_for_hf``) and the weights as safetensors and as a pickle.  Returns the weights."""
    from pathlib import Path

    from open_clip.push_to_hf_hub import save_config_for_hf

    open_clip.add_model_config(TINY)
    torch.manual_seed(seed)
    model = open_clip.create_model("tiny-clip", force_preprocess_cfg={"mean": HALF, "std": HALF})
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if misshape:
        sd[misshape] = torch.zeros(5, 5)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(root / "open_clip_model.safetensors"))
    torch.save(sd, root / "open_clip_pytorch_model.bin")
    save_config_for_hf(model, root / "open_clip_config.json", model_config=TINY_CFG)
    return sd


def fill_hf_cache(cache, repo: str, files: dict) -> None:
    """Put ``files`` (name -> source path) into a Hugging Face cache as a downloaded snapshot."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)


@pytest.fixture()
def hf_cache(monkeypatch, tmp_path):
    """An offline Hugging Face cache the test fills (HF_HUB_OFFLINE, as on a machine without network)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def build(*flags: str):
    from dsclip.config import parse_args
    from dsclip.model import create_model

    return create_model(parse_args([*flags, "--lr", "1e-4"]))


def normalize_of(preprocess):
    from torchvision.transforms import Normalize

    return next(t for t in preprocess.transforms if isinstance(t, Normalize))


def assert_loaded(bundle, sd: dict[str, torch.Tensor]) -> None:
    assert_same(bundle.model.state_dict(), sd)
    assert tuple(normalize_of(bundle.preprocess_val).mean) == HALF  # the repo's preprocess_cfg


def test_local_dir_model_loads_config_and_weights_through_dsclip(tmp_path):
    root = tmp_path / "my-clip"
    sd = save_repo(root)
    source = P.resolve_model_source(f"local-dir:{root}")
    assert source.weights == str(root / "open_clip_model.safetensors") and source.config == TINY_CFG
    bundle = build("--model", f"local-dir:{root}")
    assert_loaded(bundle, sd)
    assert bundle.model_cfg == TINY_CFG  # recorded in checkpoints and beside exports
    assert P.resolve_model_source("ViT-B-32") == P.ModelSource("ViT-B-32")


def test_local_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="directory not found"):
        P.resolve_model_source(f"local-dir:{tmp_path / 'nope'}")
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        P.resolve_model_source(f"local-dir:{tmp_path}")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"preprocess_cfg": {}}))
    with pytest.raises(ConfigError, match="model_cfg"):
        P.resolve_model_source(f"local-dir:{tmp_path}")


def test_hf_hub_model_loads_from_a_filled_cache(tmp_path, hf_cache):
    from dsclip.model import register_model

    repo_dir = tmp_path / "repo"
    sd = save_repo(repo_dir)
    files = ("open_clip_config.json", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    fill_hf_cache(hf_cache, "dsclip-test/tiny-clip", {f: repo_dir / f for f in files})
    bundle = build("--model", "hf-hub:dsclip-test/tiny-clip")
    assert_loaded(bundle, sd)
    assert bundle.model_cfg == TINY_CFG and bundle.name == "hf-hub-dsclip-test--tiny-clip"
    assert any("loaded pretrained weights from hf-hub:dsclip-test/tiny-clip" in n for n in bundle.notes)
    assert register_model("hf-hub:dsclip-test/tiny-clip") == bundle.name  # dsclip eval/wiseft/plan


def test_hf_hub_mis_shaped_key_is_one_clear_error(tmp_path, hf_cache):
    repo_dir = tmp_path / "repo"
    save_repo(repo_dir, misshape="text_projection")
    fill_hf_cache(hf_cache, "dsclip-test/bad-clip", {f: repo_dir / f for f in
                                                      ("open_clip_config.json", "open_clip_model.safetensors")})
    with pytest.raises(ConfigError) as err:
        build("--model", "hf-hub:dsclip-test/bad-clip")
    msg = str(err.value)
    assert "1 mis-shaped: text_projection [5, 5] vs model [32, 32]" in msg and "\n" not in msg


def test_hf_hub_offline_is_a_clear_error(offline):
    with pytest.raises(ConfigError, match="cannot be reached.*local-dir"):
        P.resolve_model_source("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")


def test_tag_downloads_through_open_clip_from_a_filled_cache(tmp_path, hf_cache, monkeypatch):
    """Tags resolve through open_clip's own table and hub code: a real tag's repo and file name,
    and a tag whose hf_hub entry names a pickle (tried after its .safetensors alternative)."""
    from open_clip import pretrained as ocp

    sd = save_repo(tmp_path / "repo")
    # ViT-B-32 laion2b_s34b_b79k is hf_hub 'laion/CLIP-ViT-B-32-laion2B-s34B-b79K/': open_clip asks for
    # open_clip_pytorch_model.bin and prefers its safetensors twin
    fill_hf_cache(hf_cache, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
                  {"open_clip_model.safetensors": tmp_path / "repo" / "open_clip_model.safetensors"})
    assert_same(P.load_pretrained_state_dict("laion2b_s34b_b79k", "ViT-B-32"), sd)

    fill_hf_cache(hf_cache, "dsclip-test/tiny-tag",
                  {"weights.bin": tmp_path / "repo" / "open_clip_pytorch_model.bin"})
    monkeypatch.setitem(ocp._PRETRAINED, "tiny-clip",
                        {"dsclip_test": ocp._pcfg(hf_hub="dsclip-test/tiny-tag/weights.bin", mean=HALF, std=HALF)})
    bundle = build("--model", TINY, "--pretrained", "dsclip_test")
    assert_loaded(bundle, sd)  # weights and the tag's mean/std


# ------------------------------------------------------------------ SigLIP's logit init


def test_siglip_model_gets_siglip_init_unless_the_checkpoint_has_it(tmp_path):
    import math

    fresh = build("--model", TINY, "--siglip")
    assert float(fresh.model.logit_bias.detach()) == -10.0
    assert float(fresh.model.logit_scale.detach()) == pytest.approx(math.log(10))
    assert fresh.model_cfg["init_logit_bias"] == -10.0  # an export's .model.json rebuilds logit_bias

    clip_ckpt = tmp_path / "clip.safetensors"  # InfoNCE weights: logit_scale ln(100), no logit_bias
    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(clip_ckpt))
    from_clip = build("--model", TINY, "--siglip", "--pretrained", str(clip_ckpt))
    assert float(from_clip.model.logit_bias.detach()) == -10.0
    assert float(from_clip.model.logit_scale.detach()) == pytest.approx(math.log(10))
    assert any("not a SigLIP checkpoint" in n for n in from_clip.notes)

    sd = dict(fresh.model.state_dict(), logit_bias=torch.tensor(-4.0), logit_scale=torch.tensor(2.5))
    siglip_ckpt = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(siglip_ckpt))
    kept = build("--model", TINY, "--siglip", "--pretrained", str(siglip_ckpt))
    assert float(kept.model.logit_bias.detach()) == -4.0 and float(kept.model.logit_scale.detach()) == 2.5
    with pytest.raises(ConfigError, match="unexpected: logit_bias.*pass --siglip"):
        build("--model", TINY, "--pretrained", str(siglip_ckpt))


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


# ------------------------------------------------------------------ every other reader of checkpoint pickles


@pytest.fixture()
def planted(tmp_path):
    """A complete-looking dsclip run whose model-states pickle carries a live payload (it runs on a
    plain ``torch.load``), and the file the payload would create."""
    from tests.faults.test_hostile import _poisoned_tag

    sentinel = tmp_path / "payload-ran"
    tag_dir = _poisoned_tag(tmp_path, sentinel)
    torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)
    assert sentinel.exists()
    sentinel.unlink()
    return tmp_path / "evil", tag_dir, sentinel


def test_export_refuses_a_planted_pickle(planted, tmp_path, capsys):
    from dsclip import export

    run_dir, _, sentinel = planted
    out = tmp_path / "out.safetensors"
    assert export.main([str(run_dir), str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("dsclip export: error:"), err
    assert "io.open" in err[0] and "--trust-checkpoint" in err[0]
    assert not sentinel.exists() and not out.exists()


def test_reused_universal_copy_is_vetted(tmp_path):
    """A ``<tag>_universal/`` dir found on disk (synced, shared) is loaded by DeepSpeed with
    ``weights_only=False`` like the tag itself; resume refuses one with a planted pickle."""
    from dsclip.checkpoint import write_manifest
    from dsclip.reshard import MARKER, _fingerprint, prepare_resume
    from tests.faults.test_hostile import _Payload

    ckpt_dir = tmp_path / "checkpoints"
    tag_dir = ckpt_dir / "step_00000002"
    tag_dir.mkdir(parents=True)
    torch.save({"module": tiny_model().state_dict()}, tag_dir / "mp_rank_00_model_states.pt")  # clean
    write_manifest(str(tag_dir), {"step": 2, "zero_stage": 2, "world_size": 1})
    universal = ckpt_dir / "step_00000002_universal"
    (universal / "zero" / "logit_scale").mkdir(parents=True)
    sentinel = tmp_path / "payload-ran"
    torch.save({"param": torch.zeros(1), "x": _Payload(str(sentinel))}, universal / "zero" / "logit_scale" / "fp32.pt")
    (universal / MARKER).write_text(json.dumps({"source_fingerprint": _fingerprint(str(tag_dir))}))
    with pytest.raises(ConfigError, match=r"cannot resume from .*_universal.*io\.open.*trust-checkpoint"):
        prepare_resume(str(ckpt_dir), "step_00000002", 2, 0)
    assert not sentinel.exists()
    # trusted, the finished copy is reused as it is
    assert prepare_resume(str(ckpt_dir), "step_00000002", 2, 0, trust=True)[1] == "step_00000002_universal"
