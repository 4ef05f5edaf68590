"""Fast unit tests of the core pieces: config precedence, the DeepSpeed "auto" fill-in, LR
schedules, the 0-dim parameter adaptation, checkpoint bookkeeping, and CLI errors."""

from __future__ import annotations

import glob
import json
import os

import open_clip
import pytest
import torch

from dsclip import checkpoint as ckpt
from dsclip.config import Config, ConfigError, parse_args, save_yaml, to_argv
from dsclip.engine import (
    DEFAULT_DS_CONFIG,
    fill_device_defaults,
    fill_ds_config,
    fill_zero3_buckets,
    load_ds_config,
    model_hidden_size,
    without_auto_buckets,
)
from dsclip.model import promote_scalar_params, register_model, to_open_clip_shapes
from dsclip.schedule import GroupLR, lr_factor_fn
from tests.launch import ROOT, TINY

# ------------------------------------------------------------------ config

def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  lr: 0.001\n  batch_size: 8\nrun:\n  seed: 3\nwd: 0.05\n")
    cfg = parse_args(["--config", str(y), "--lr", "0.002"])
    assert cfg.optim.lr == 0.002  # flag beats YAML
    assert cfg.optim.batch_size == 8 and cfg.run.seed == 3 and cfg.optim.wd == 0.05  # YAML beats defaults
    assert cfg.optim.beta2 == Config().optim.beta2  # default
    assert cfg.is_set("optim.lr") and cfg.is_set("optim.batch_size") and not cfg.is_set("optim.beta2")


def test_open_clip_flag_names_carry_over():
    cfg = parse_args(["--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k", "--lock-image",
                      "--lock-image-unlocked-groups", "2", "--force-image-size", "336", "--accum-freq", "2",
                      "--lr-scheduler", "const-cooldown", "--epochs-cooldown", "1", "--grad-clip-norm", "1.0",
                      "--report-to", "tensorboard", "--deepspeed_config", "x.json", "--local_rank=1"])
    assert cfg.strategy.lock_image and cfg.strategy.lock_image_unlocked_groups == 2
    assert cfg.model.force_image_size == [336] and cfg.run.ds_config == "x.json" and cfg.run.local_rank == 1
    assert parse_args(to_argv(cfg, only_explicit=True)).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("text,needle", [
    ("optim:\n  lrr: 1\n", "optim.lrr"),
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("bogus: 1\n", "bogus"),
    ("optim:\n  batch_size: 2.5\n", "optim.batch_size"),
])
def test_yaml_errors_name_the_key(tmp_path, text, needle):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        parse_args(["--config", str(y)])


def test_params_yaml_masks_secrets(tmp_path):
    config = tmp_path / "run.yaml"  # a URL with credentials is refused on the command line
    config.write_text("data:\n  train_data: s3://AKIAXXXX:sup3rsecret@bucket/x-{0..3}.tar\n")
    cfg = parse_args(["--config", str(config)])
    save_yaml(cfg, str(tmp_path / "p.yaml"))
    text = (tmp_path / "p.yaml").read_text()
    assert "sup3rsecret" not in text and "AKIAXXXX" not in text and "bucket/x-{0..3}.tar" in text


# ------------------------------------------------------------------ DeepSpeed config

def test_ds_configs_load_and_zero2_is_the_default(tmp_path):
    files = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
    assert {os.path.basename(f) for f in files} >= {"zero1.json", "zero2.json", "zero3.json", "zero3_offload.json",
                                                    "zero3_nvme.json"}
    cfg = parse_args(["--lr", "1e-4", "--nvme-path", str(tmp_path)])
    model = open_clip.create_model(register_model(TINY))
    for f in files:
        ds = fill_zero3_buckets(fill_ds_config(load_ds_config(f), cfg, world=2, precision="fp32"), model)
        for on_gpu in (True, False):
            filled = fill_device_defaults(ds, on_gpu)
            assert "auto" not in json.dumps(filled), f
            if os.path.basename(f) == "zero2.json":  # one gradient buffer on GPUs only
                assert filled["zero_optimization"]["contiguous_gradients"] is on_gpu
    assert load_ds_config(os.path.join(ROOT, "ds_configs", "zero2.json")) == DEFAULT_DS_CONFIG


def test_zero3_buffers_are_sized_from_the_model_and_explicit_values_kept():
    """DeepSpeed's defaults (5e7-element buckets) hold a third of a ViT-B-32 per bucket; "auto"
    sizes them from the widest hidden size h (768 here): h^2 buckets, 10 h persistence."""
    ds = load_ds_config(os.path.join(ROOT, "ds_configs", "zero3.json"))
    b32 = open_clip.create_model("ViT-B-32", device="meta")
    assert model_hidden_size(b32) == 768
    zo = fill_zero3_buckets(ds, b32)["zero_optimization"]
    assert zo["reduce_bucket_size"] == 768 ** 2 and zo["stage3_prefetch_bucket_size"] == int(0.9 * 768 ** 2)
    assert zo["stage3_param_persistence_threshold"] == 7680 and zo["stage3_max_live_parameters"] == 10 * 768 ** 2
    assert zo["sub_group_size"] == 10 * 768 ** 2
    ds["zero_optimization"]["reduce_bucket_size"] = 12345
    assert fill_zero3_buckets(ds, b32)["zero_optimization"]["reduce_bucket_size"] == 12345
    # zero.Init runs before the model exists: it gets the config without the "auto" sizes
    assert "auto" not in json.dumps(without_auto_buckets(ds)["zero_optimization"])
    z2 = {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    assert fill_zero3_buckets(z2, b32)["zero_optimization"] == {"stage": 2}  # DeepSpeed's own default


def test_nvme_path_comes_from_the_flag_and_must_be_a_directory(tmp_path):
    nvme = load_ds_config(os.path.join(ROOT, "ds_configs", "zero3_nvme.json"))
    zo = fill_ds_config(nvme, parse_args(["--nvme-path", str(tmp_path)]), 2, "fp32")["zero_optimization"]
    assert zo["offload_optimizer"]["nvme_path"] == zo["offload_param"]["nvme_path"] == str(tmp_path)
    with pytest.raises(ConfigError, match="pass --nvme-path DIR"):
        fill_ds_config(nvme, parse_args([]), 2, "fp32")
    with pytest.raises(ConfigError, match="is not a writable directory"):
        fill_ds_config(nvme, parse_args(["--nvme-path", str(tmp_path / "missing")]), 2, "fp32")


def test_auto_values_filled_from_flags():
    cfg = parse_args(["--batch-size", "16", "--accum-freq", "4", "--grad-clip-norm", "1.5", "--lr", "3e-4",
                      "--wd", "0.1", "--beta2", "0.95", "--eps", "1e-8"])
    ds = fill_ds_config(DEFAULT_DS_CONFIG, cfg, world=8, precision="bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 * 4 * 8 and ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


def test_explicit_json_value_contradicting_a_flag_is_an_error():
    ds = dict(DEFAULT_DS_CONFIG, train_micro_batch_size_per_gpu=32)
    fill_ds_config(ds, parse_args([]), world=1, precision="fp32")  # no flag: the JSON value stands
    with pytest.raises(ConfigError, match="contradicts"):
        fill_ds_config(ds, parse_args(["--batch-size", "16"]), world=1, precision="fp32")
    import copy

    opt = copy.deepcopy(DEFAULT_DS_CONFIG)
    opt["optimizer"]["params"]["betas"] = [0.9, 0.999]
    assert fill_ds_config(opt, parse_args([]), 1, "fp32")["optimizer"]["params"]["betas"] == [0.9, 0.999]
    fill_ds_config(opt, parse_args(["--beta2", "0.999"]), 1, "fp32")  # agreeing flag: fine
    for flags, key in ((["--beta2", "0.95"], "betas"), (["--beta1", "0.8"], "betas")):
        with pytest.raises(ConfigError, match=key):
            fill_ds_config(opt, parse_args(flags), 1, "fp32")
    with pytest.raises(ConfigError, match="gradient_clipping"):
        fill_ds_config(dict(DEFAULT_DS_CONFIG, gradient_clipping=1.0), parse_args(["--grad-clip-norm", "2"]), 1,
                       "fp32")
    with pytest.raises(ConfigError, match="bf16.enabled"):
        fill_ds_config(dict(DEFAULT_DS_CONFIG, bf16={"enabled": True}), parse_args(["--precision", "fp32"]), 1,
                       "fp32")
    with pytest.raises(ConfigError, match="scheduler"):
        fill_ds_config(dict(DEFAULT_DS_CONFIG, scheduler={"type": "WarmupLR"}), parse_args([]), 1, "fp32")


# ------------------------------------------------------------------ schedule

def test_schedules():
    cos = lr_factor_fn("cosine", warmup=10, total_steps=110)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and cos(110) == pytest.approx(0.0, abs=1e-12)
    const = lr_factor_fn("const", warmup=0, total_steps=10)
    assert const(0) == const(9) == 1.0
    cd = lr_factor_fn("const-cooldown", warmup=0, total_steps=100, cooldown_steps=20)
    assert cd(79) == 1.0 and cd(90) == pytest.approx(0.5) and cd(100) == pytest.approx(0.0)


def test_schedule_scales_each_groups_own_lr():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 1e-5}])
    sched = GroupLR(opt, lr_factor_fn("cosine", warmup=4, total_steps=8))
    sched.set_step(1)
    assert sched.current_lrs() == pytest.approx([5e-4, 5e-6])


# ------------------------------------------------------------------ 0-dim parameters

def test_promoted_scalars_keep_open_clip_shapes():
    open_clip.add_model_config(TINY)
    model = open_clip.create_model("tiny-clip", output_dict=True)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    promoted = promote_scalar_params(model)
    assert promoted == ["logit_scale"] and model.logit_scale.shape == (1,)
    # DeepSpeed's broadcast views every parameter as bytes; that must now work
    assert all(p.data.view(torch.uint8).numel() > 0 for p in model.parameters())
    sd = model.state_dict()
    assert sd["logit_scale"].shape == torch.Size([]) and torch.equal(sd["logit_scale"], ref["logit_scale"])
    model.load_state_dict(ref, strict=True)  # open_clip-shaped dicts load back
    restored = to_open_clip_shapes({"logit_scale": torch.ones(1)}, ref)
    assert restored["logit_scale"].shape == torch.Size([])
    image = torch.randn(2, 3, 32, 32)
    text = open_clip.get_tokenizer("tiny-clip")(["a red dot", "a blue square"])
    assert model(image=image, text=text)["logit_scale"].numel() == 1


# ------------------------------------------------------------------ checkpoints

def _fake_tag(ckpt_dir, step, complete=True):
    tag_dir = os.path.join(ckpt_dir, ckpt.tag_for(step))
    os.makedirs(tag_dir)
    with open(os.path.join(tag_dir, "model.pt"), "wb") as fh:
        fh.write(b"x" * 100)
    if complete:
        ckpt.write_manifest(tag_dir, {"step": step})
    return tag_dir


def test_latest_falls_back_to_newest_complete(tmp_path):
    d = str(tmp_path)
    _fake_tag(d, 5)
    t10 = _fake_tag(d, 10)
    _fake_tag(d, 15, complete=False)
    ckpt.atomic_write_text(os.path.join(d, "latest"), "step_00000010")
    assert ckpt.resolve_tag(d) == "step_00000010"
    with open(os.path.join(t10, "model.pt"), "ab") as fh:  # torn after its manifest: size check catches it
        fh.write(b"more")
    with pytest.warns(UserWarning, match="incomplete"):
        assert ckpt.resolve_tag(d) == "step_00000005"
    assert ckpt.locate(os.path.join(d, "step_00000005")) == (d, "step_00000005")


def test_prune_keeps_last_n_and_protected(tmp_path):
    d = str(tmp_path)
    for s in (1, 2, 3, 4):
        _fake_tag(d, s)
    ckpt.prune(d, keep_last_n=2, protect=("step_00000001",))
    assert sorted(os.listdir(d)) == ["step_00000001", "step_00000003", "step_00000004"]


# ------------------------------------------------------------------ CLI errors

@pytest.mark.parametrize("argv,needle", [
    (["--bogus-flag"], "--bogus-flag"),
    (["--model", "/nope/tiny.json"], "model config not found"),
    (["--pretrained", "/nope/w.safetensors"], "--pretrained file not found"),
    (["--resume", "latest"], "--name"),
    (["--precision", "fp16"], "fp16"),
    (["--batch-size", "0"], "--batch-size"),
    (["--train-data-upsampling-factors", "1::2"], "--dataset-resampled"),
    (["--lr-scheduler", "const-cooldown"], "--epochs-cooldown"),
    (["--ds_config", "/nope.json"], "/nope.json"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    from dsclip.train import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsclip: error:") and needle in err[0], err


def test_cli_dispatch(capsys):
    from dsclip.cli import main

    assert main([]) == 0 and "train" in capsys.readouterr().out
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_exports_are_byte_for_byte_reproducible(tmp_path):
    """safetensors orders metadata keys by a per-process hash: more than one key and two exports of
    the same weights differ in their header.  The export keeps to one key (and sorts its JSON)."""
    import struct

    from dsclip.export import save_weights

    sd = {"b": torch.ones(3), "a": torch.zeros(2, 2)}
    cfg = {"vision_cfg": {"width": 64, "image_size": 32}, "embed_dim": 32}
    save_weights(sd, str(tmp_path / "x.safetensors"), cfg)
    save_weights(sd, str(tmp_path / "y.safetensors"), dict(reversed(list(cfg.items()))))
    raw = (tmp_path / "x.safetensors").read_bytes()
    header = json.loads(raw[8: 8 + struct.unpack("<Q", raw[:8])[0]])
    assert list(header["__metadata__"]) == ["dsclip_model_config"]
    assert raw == (tmp_path / "y.safetensors").read_bytes()
