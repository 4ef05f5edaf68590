"""The typed config tree and the CLI that fills it.

Every option is defined once, as a dataclass field whose metadata carries the flag name
(open_clip's spelling wherever open_clip has the option) and the help text.  Sources apply in
this order: defaults < YAML file (``--config``) < command-line flags.  ``Config.explicit``
records which fields a YAML file or a flag set, so later stages (strategy defaults, the
DeepSpeed ``"auto"`` fill-in) can tell a user's choice from a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A user-facing configuration problem: one line naming the problem and the fix."""


def opt(default: Any, help: str, flag: str | None = None, aliases: tuple[str, ...] = (),
        choices: tuple | None = None, nargs: str | None = None, secret: bool = False,
        metavar: str | None = None):
    meta = {"help": help, "flag": flag, "aliases": aliases, "choices": choices, "nargs": nargs,
            "secret": secret, "metavar": metavar}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    model: str = opt("ViT-B-32", "open_clip model name, hf-hub:org/repo, local-dir:/path, or a path to an "
                     "open_clip-style model-config JSON")
    pretrained: str = opt("", "pretrained tag (e.g. laion2b_s34b_b79k) or a local .pt/.bin/.safetensors file, "
                          "open_clip checkpoint, dsclip export or DeepSpeed checkpoint dir")
    pretrained_image: str = opt("", "LiT: timm model name or local timm checkpoint for the image tower")
    force_image_size: list | None = opt(None, "train at this image size (H [W]); interpolates the "
                                           "visual positional embedding", nargs="+", metavar="H [W]")
    force_context_length: int | None = opt(None, "text context length; interpolates the text "
                                              "positional embedding")
    force_patch_dropout: float | None = opt(None, "patch dropout during training (FLIP); off at eval")
    grad_checkpointing: bool = opt(False, "activation checkpointing in both towers")
    trust_checkpoint: bool = opt(False, "allow pickled (non weights_only) checkpoints; only for files you trust")
    zero_init: str = opt("auto", "build the model inside deepspeed.zero.Init under ZeRO-3",
                         choices=("auto", "on", "off"))


@dataclass
class DataConfig:
    train_data: str = opt("", "training data: shards (s3://, http(s)://, local, pipe:), a CSV, or '' for "
                          "synthetic; join several sources with '::'")
    val_data: str = opt("", "validation data, same forms as --train-data")
    dataset_type: str = opt("auto", "data source kind", choices=("auto", "synthetic", "webdataset", "csv"))
    train_num_samples: int | None = opt(None, "samples per epoch (default: sizes.json/__len__, or 1024 "
                                           "for synthetic)")
    val_num_samples: int | None = opt(None, "validation samples (default: sizes.json, or 256 for synthetic)")
    train_data_upsampling_factors: str | None = opt(None, "per-source weights for '::'-joined "
                                                       "--train-data, e.g. 1::0.5 (needs --dataset-resampled)")
    dataset_resampled: bool = opt(False, "sample shards with replacement")
    workers: int = opt(1, "data loader workers per rank")
    shuffle_buffer: int = opt(1000, "sample shuffle buffer size (webdataset)")
    s3_endpoint_url: str | None = opt(None, "S3 endpoint for the data and --remote-sync (default: "
                                         "AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)")
    allow_pipe_urls: bool = opt(False, "accept pipe: URLs, which run a shell command")
    max_skip_fraction: float = opt(0.01, "stop when more than this fraction of samples is unreadable")
    shard_retries: int = opt(10, "retries per shard on transient storage errors before it is skipped; the "
                             "backoff (0.25 s doubling, capped at 8 s) waits 47.75 s over the default 10, "
                             "enough to ride out a 30 s storage outage")
    max_image_pixels: int = opt(89_478_485, "skip images with more pixels than this (decompression bombs)")
    csv_img_key: str = opt("filepath", "CSV column holding the image path")
    csv_caption_key: str = opt("title", "CSV column holding the caption")
    csv_separator: str = opt("\t", "CSV separator")
    synthetic_image_size: int | None = opt(None, "synthetic data image size (default: model's)")


@dataclass
class OptimConfig:
    batch_size: int = opt(64, "batch size per rank (micro batch)")
    accum_freq: int = opt(1, "micro batches per optimizer step")
    accum_mode: str = opt("contrastive", "contrastive: K micro batches act as one batch K times larger, with "
                          "all negatives (feature caching); plain: DeepSpeed's per-micro-batch accumulation",
                          choices=("contrastive", "plain"))
    epochs: int | None = opt(None, "number of epochs (default: the strategy's recommendation)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (default: epochs)")
    lr: float | None = opt(None, "base learning rate (default: the strategy's recommendation)")
    wd: float = opt(0.2, "weight decay")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.98, "Adam beta2")
    eps: float = opt(1e-6, "Adam epsilon")
    warmup: int | None = opt(None, "warmup steps (default: the strategy's recommendation)")
    lr_scheduler: str = opt("cosine", "LR schedule after warmup", choices=("cosine", "const", "const-cooldown"))
    epochs_cooldown: int | None = opt(None, "const-cooldown: epochs of cooldown at the end")
    lr_cooldown_power: float = opt(1.0, "const-cooldown: power of the cooldown decay")
    lr_cooldown_end: float = opt(0.0, "const-cooldown: final lr")
    grad_clip_norm: float | None = opt(None, "clip gradients to this global norm")
    image_lr: float | None = opt(None, "learning rate of the image tower (default: --lr)")
    text_lr: float | None = opt(None, "learning rate of the text tower (default: --lr)")
    image_wd: float | None = opt(None, "weight decay of the image tower (default: --wd)")
    text_wd: float | None = opt(None, "weight decay of the text tower (default: --wd)")
    image_layer_decay: float = opt(1.0, "layer-wise lr decay of the image tower (EVA-CLIP style)")
    text_layer_decay: float = opt(1.0, "layer-wise lr decay of the text tower")
    wd_exclude: list = opt([], "extra parameter-name globs with no weight decay", nargs="*")


@dataclass
class StrategyConfig:
    strategy: str = opt("full", "fine-tuning strategy",
                        choices=("full", "lock-image", "lock-text", "partial", "lit"))
    lock_image: bool = opt(False, "freeze the image tower")
    lock_image_unlocked_groups: int = opt(0, "leave the last N image-tower groups trainable")
    lock_image_freeze_bn_stats: bool = opt(False, "freeze BatchNorm statistics of locked image layers")
    lock_text: bool = opt(False, "freeze the text tower")
    lock_text_unlocked_layers: int = opt(0, "leave the last N text-tower layers trainable")
    lock_text_freeze_layer_norm: bool = opt(False, "also freeze LayerNorm of locked text layers")
    partial_unlocked_image_groups: int = opt(2, "partial: trainable image-tower groups at the top")
    partial_unlocked_text_layers: int = opt(2, "partial: trainable text-tower layers at the top")
    lock_logit_scale: bool = opt(False, "freeze logit_scale (it trains by default)")
    dump_param_groups: bool = opt(False, "print the parameter-group table and write param_groups.json")


@dataclass
class LossConfig:
    local_loss: bool = opt(True, "each rank computes logits for its own rows only (O(b*B) memory)")
    gather_with_grad: bool = opt(True, "let gradients flow through the feature all-gather")
    siglip: bool = opt(False, "sigmoid (SigLIP) loss instead of InfoNCE")
    loss_chunk_size: int | None = opt(None, "compute the logits in chunks of this many rows")


@dataclass
class EvalConfig:
    zeroshot_data: str = opt("", "zero-shot datasets: name=path[,name=path] (image folder or shards with cls)")
    imagenet_val: str = opt("", "ImageNet val folder (built-in classnames and templates)")
    zeroshot_frequency: int = opt(1, "zero-shot eval every N epochs (0: never)")
    val_frequency: int = opt(1, "validation every N epochs (0: never)")
    eval_every_n_steps: int = opt(0, "also evaluate every N optimizer steps (0: off)")
    baseline_eval: bool = opt(True, "evaluate the starting model before step 0")
    overfit_patience: int = opt(3, "warn when val loss rises this many evals in a row while train loss falls")
    forget_threshold: float = opt(5.0, "warn when zero-shot top-1 falls this many points below baseline")
    early_stop: str = opt("off", "stop training when a guard fires",
                          choices=("off", "overfit", "forget", "any"))
    keep_best: str | None = opt(None, "keep the best checkpoint by this logged metric (prefix - to minimise)")
    wise_ft_alphas: str | None = opt(None, "after training, run a WiSE-FT sweep over these alphas (e.g. 0:1:0.1)")


@dataclass
class RunConfig:
    # torchrun's own parser grabs `--logs` as an abbreviation of its --logs-specs: use --logs-dir there
    logs: str = opt("./logs", "where run directories go (alias --logs-dir, which torchrun leaves alone)",
                    aliases=("--logs-dir",))
    name: str | None = opt(None, "run name (default: a timestamp)")
    resume: str | None = opt(None, "resume from a checkpoint path or 'latest'")
    precision: str = opt("auto", "numeric precision (auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU)",
                         choices=("auto", "fp32", "bf16", "fp16"))
    seed: int = opt(0, "random seed")
    save_frequency: int = opt(1, "save a checkpoint every N epochs (0: only at the end)")
    save_every_n_steps: int = opt(0, "also save every N optimizer steps (0: off)")
    keep_last_n: int = opt(2, "keep the last N checkpoints")
    log_every_n_steps: int = opt(10, "progress line every N optimizer steps")
    report_to: str = opt("tensorboard", "comma list of tensorboard, wandb ('' for none)")
    ds_config: str | None = opt(None, "DeepSpeed JSON config (default: built-in ZeRO-2)",
                                   flag="--ds_config", aliases=("--deepspeed_config", "--ds-config"))
    local_rank: int = opt(-1, "set by the deepspeed launcher", flag="--local_rank", aliases=("--local-rank",))
    nvme_path: str | None = opt(None, "local NVMe directory for ZeRO-Infinity offload (fills an \"auto\" nvme_path, "
                                      "as in ds_configs/zero3_nvme.json)")
    dist_timeout: float = opt(300.0, "seconds before a stuck collective aborts the job")
    remote_sync: str | None = opt(None, "upload each completed checkpoint to this s3:// prefix")
    memory_check: bool = opt(True, "refuse up front when `dsclip plan`'s estimate exceeds this rank's memory")
    memory_budget_gib: float | None = opt(None, "per-rank memory for that check (default: the device's memory; on "
                                             "CPU the available RAM shared by the local ranks)")
    threads: int | None = opt(None, "torch CPU threads per rank (default: cores / local ranks)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # dotted names ("optim.lr") set by a YAML file or a flag, not by defaults
    explicit: set = field(default_factory=set, repr=False, compare=False)

    def is_set(self, dotted: str) -> bool:
        return dotted in self.explicit

    def to_dict(self, mask_secrets: bool = True) -> dict:
        out = {}
        for sec in SECTIONS:
            out[sec] = {}
            for f in dataclasses.fields(getattr(self, sec)):
                val = getattr(getattr(self, sec), f.name)
                if mask_secrets and val:
                    if f.metadata.get("secret") or _looks_secret(f.name, val):
                        val = "***"
                    elif isinstance(val, str):
                        val = mask_url_credentials(val)
                out[sec][f.name] = val
        return out


SECTIONS = ("model", "data", "optim", "strategy", "loss", "eval", "run")
_SECRET_WORDS = ("secret", "password", "token", "access_key", "credential", "api_key")


def _looks_secret(name: str, val: Any) -> bool:
    return any(w in name.lower() for w in _SECRET_WORDS)


def mask_url_credentials(text: str) -> str:
    """Hide credentials embedded in URLs (``s3://KEY:SECRET@bucket/...``)."""
    import re

    return re.sub(r"(://)[^/@\s]+@", r"\1***@", text)


def _field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of a dataclass field, resolving string annotations."""
    hint = f.type
    if isinstance(hint, str):
        hint = eval(hint, {"Optional": Optional, "list": list, "dict": dict})
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = True
        hint = args[0]
    return (typing.get_origin(hint) or hint), optional


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _all_fields():
    for sec in SECTIONS:
        for f in dataclasses.fields(globals()[_SECTION_CLASSES[sec]]):
            yield sec, f


_SECTION_CLASSES = {"model": "ModelConfig", "data": "DataConfig", "optim": "OptimConfig",
                    "strategy": "StrategyConfig", "loss": "LossConfig", "eval": "EvalConfig",
                    "run": "RunConfig"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, no usage dump
        raise ConfigError(f"{message} (see `dsclip train --help`)")


def build_parser(prog: str = "dsclip train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Fine-tune an open_clip model with DeepSpeed.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", default=None, help="YAML config file (defaults < YAML < flags)")
    for sec, f in _all_fields():
        typ, _ = _field_type(f)
        names = [flag_name(f), *f.metadata.get("aliases", ())]
        kw: dict[str, Any] = {"dest": f"{sec}.{f.name}", "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if typ is list:
                kw["nargs"] = f.metadata.get("nargs") or "*"
                kw["type"] = int if f.name == "force_image_size" else str
            else:
                kw["type"] = typ
                if f.metadata.get("nargs"):
                    kw["nargs"] = f.metadata["nargs"]
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
        group_help = f"default: {f.default!r}" if f.default is not dataclasses.MISSING else ""
        kw["help"] = f"{kw['help']} ({group_help})" if group_help else kw["help"]
        p.add_argument(*names, **kw)
    return p


def _coerce(sec: str, f: dataclasses.Field, value: Any, source: str) -> Any:
    typ, optional = _field_type(f)
    key = f"{sec}.{f.name}"
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' must not be null; remove it or give a {typ.__name__}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if typ is list and not isinstance(value, list):
        value = [value]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{key}' must be {typ.__name__}, got {type(value).__name__} "
                          f"{value!r}; fix the value")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{source}: '{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def load_yaml(path: str, cfg: Config) -> None:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file to --config")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections ({', '.join(SECTIONS)})")
    flat = {fl.name: sec for sec, fl in _all_fields()}
    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: section '{key}' must be a mapping")
            items = [(key, k, v) for k, v in value.items()]
        elif key.replace("-", "_") in flat:  # flat keys are accepted too (`lr: 1e-5`)
            items = [(flat[key.replace("-", "_")], key, value)]
        else:
            raise ConfigError(f"{path}: unknown key '{key}'; valid sections are {', '.join(SECTIONS)}")
        for sec, k, v in items:
            k = k.replace("-", "_")
            fields = {fl.name: fl for fl in dataclasses.fields(getattr(cfg, sec))}
            if k not in fields:
                raise ConfigError(f"{path}: unknown key '{sec}.{k}'; check the spelling against "
                                  f"`dsclip train --help`")
            setattr(getattr(cfg, sec), k, _coerce(sec, fields[k], v, path))
            cfg.explicit.add(f"{sec}.{k}")


def parse_args(argv: list[str] | None = None) -> Config:
    """defaults < YAML (--config) < flags.  Raises ConfigError on any problem."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(argv)
    cfg = Config()
    if getattr(ns, "config", None):
        load_yaml(ns.config, cfg)
    fields = {f"{sec}.{f.name}": (sec, f) for sec, f in _all_fields()}
    for dest, value in vars(ns).items():
        if dest == "config":
            continue
        sec, f = fields[dest]
        _refuse_url_credentials(flag_name(f), value)
        setattr(getattr(cfg, sec), f.name, _coerce(sec, f, value, "flag " + flag_name(f)))
        cfg.explicit.add(dest)
    return cfg


def _refuse_url_credentials(flag: str, value: Any) -> None:
    """A command line is not a safe place for a secret: launchers log it (the deepspeed launcher
    prints every rank's full command) and ``ps`` shows it to every user of the machine."""
    for text in value if isinstance(value, list) else [value]:
        if isinstance(text, str) and mask_url_credentials(text) != text:
            raise ConfigError(f"{flag} {mask_url_credentials(text)}: the URL carries credentials, and launchers "
                              f"log the command line; put the URL in the --config YAML file, or give the "
                              f"credentials through the environment or the AWS credential chain")


def to_argv(cfg: Config, only_explicit: bool = False) -> list[str]:
    """Render a config back into flags (used by `dsclip demo` and the launch templates' tests)."""
    argv: list[str] = []
    for sec, f in _all_fields():
        dotted = f"{sec}.{f.name}"
        if only_explicit and dotted not in cfg.explicit:
            continue
        val = getattr(getattr(cfg, sec), f.name)
        if val is None:
            continue
        typ, _ = _field_type(f)
        if typ is bool:
            argv.append(flag_name(f) if val else "--no-" + flag_name(f)[2:])
        elif typ is list:
            if val:
                argv += [flag_name(f), *map(str, val)]
        else:
            argv += [flag_name(f), str(val)]
    return argv


def save_yaml(cfg: Config, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(cfg.to_dict(mask_secrets=True), fh, sort_keys=False)
    os.replace(tmp, path)
