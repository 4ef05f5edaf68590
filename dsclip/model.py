"""open_clip model creation, pretrained loading, positional-embedding resize, and the one shape
adaptation DeepSpeed needs.

DeepSpeed broadcasts every parameter as ``p.data.view(torch.uint8)``, which cannot work on a
0-dim tensor such as open_clip's ``logit_scale``.  Rather than patch DeepSpeed, the model is
given 1-element parameters in place of 0-dim ones, and state-dict hooks translate at the
boundary: ``state_dict()`` reports open_clip's shapes and ``load_state_dict`` accepts them.
Anything that reads DeepSpeed's own flat buffers (consolidated checkpoints) goes through
``to_open_clip_shapes`` instead.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError
from .pretrained import ModelSource

SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}  # open_clip's --siglip init


class _QuietRandomInit(logging.Filter):
    """open_clip warns "No pretrained weights loaded" whenever a model is built without them; dsclip
    always loads its weights separately, so the warning is only noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


logging.getLogger().addFilter(_QuietRandomInit())


@dataclass
class ModelBundle:
    model: nn.Module
    name: str  # open_clip model name (a custom JSON is registered under its file stem)
    model_cfg: dict  # the open_clip model config actually built (after forced sizes)
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    image_size: tuple[int, int]
    notes: list[str]  # what loading did (resizes, sources), for the start-up log


def register_model(model: str) -> str:
    """Return an open_clip model name for ``--model``: a JSON path is registered under its stem, a
    ``local-dir:``/``hf-hub:`` repo's config under a name of its own."""
    return resolve_model(model)[0]


def resolve_model(model: str) -> tuple[str, ModelSource]:
    """``(open_clip model name, where --model comes from)``; repo configs are registered."""
    from .pretrained import resolve_model_source

    source = resolve_model_source(model)
    return _register_name(source.model), source


def _register_name(model: str) -> str:
    import open_clip

    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise ConfigError(f"model config not found: {model}; pass an existing open_clip model-config JSON "
                              f"or a model name from `open_clip.list_models()`")
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    if model not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise ConfigError(f"unknown model {model!r}{hint}")
    return model


def model_config(name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"no model config for {name!r}")
    return json.loads(json.dumps(cfg))


def image_size_of(model: nn.Module) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def create_model(cfg: Config, device: torch.device | str = "cpu", load_weights: bool = True,
                 zero3_config: dict | None = None) -> ModelBundle:
    """Build the open_clip model named by ``cfg.model``, load ``--pretrained`` (or the weights of a
    ``local-dir:``/``hf-hub:`` repo), resizing positional embeddings to a forced image size or
    context length, and make it DeepSpeed-safe.

    With ``zero3_config`` the model is built inside ``deepspeed.zero.Init``: every module is
    partitioned as soon as it is constructed, so no rank ever holds the whole model, and weights
    are loaded module by module from rank 0."""
    import open_clip

    m = cfg.model
    base, source = resolve_model(m.model)
    name = _with_logit_bias(base) if cfg.loss.siglip else base
    notes: list[str] = []
    if source.weights:
        notes.append(f"model config from {m.model} (registered as {base})")
    weights = m.pretrained or source.weights
    if m.pretrained and source.weights:
        notes.append(f"--pretrained {m.pretrained} replaces the weights of {m.model}")
    force_size = forced_image_size(m.force_image_size)
    kwargs: dict[str, Any] = {"force_image_size": force_size, "force_context_length": m.force_context_length,
                              "force_patch_dropout": m.force_patch_dropout, "output_dict": True}
    if weights or not load_weights:  # CLIP weights replace a HF text tower's own: don't download them
        kwargs["pretrained_text"] = False
    if cfg.loss.siglip:
        kwargs.update(SIGLIP_INIT)
    transforms = _preprocess_kwargs(source.preprocess or _tag_preprocess(base, m.pretrained))
    # a repo's weights come with the config read above: what they record about themselves
    recorded = source.config if weights == source.weights else None
    load = _Load(name, base, weights, m.trust_checkpoint, cfg.loss.siglip, recorded) if load_weights and weights \
        else None
    if zero3_config is not None:
        import deepspeed

        from .engine import without_auto_buckets

        init = deepspeed.zero.Init(config_dict_or_path=without_auto_buckets(zero3_config))
        with _promote_scalars_at_init(), init:
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=None, device="cpu", **kwargs, **transforms)
        notes.append("built partitioned (deepspeed.zero.Init)")
        if load is not None:
            notes += load_pretrained_partitioned(model, load, kwargs)
        if load_weights and m.pretrained_image:
            notes += _load_image_tower_partitioned(model, name, m.pretrained_image, m.trust_checkpoint, kwargs)
    else:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, device="cpu", **kwargs, **transforms)
        if load is not None:
            notes += load_pretrained(model, load)
        if load_weights and m.pretrained_image:  # LiT: ImageNet weights for the image tower
            from .pretrained import load_pretrained_image

            notes += load_pretrained_image(model, m.pretrained_image, trust=m.trust_checkpoint)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    built_cfg = model_config(name)
    if force_size is not None:
        built_cfg["vision_cfg"]["image_size"] = force_size if isinstance(force_size, int) else list(force_size)
    if m.force_context_length:
        built_cfg["text_cfg"]["context_length"] = m.force_context_length
    if m.force_patch_dropout is not None:
        built_cfg["vision_cfg"]["patch_dropout"] = m.force_patch_dropout
    if zero3_config is None:
        promote_scalar_params(model)
    tokenizer = open_clip.get_tokenizer(name, context_length=m.force_context_length) \
        if m.force_context_length else open_clip.get_tokenizer(name)
    return ModelBundle(model.to(device), name, built_cfg, preprocess_train, preprocess_val, tokenizer,
                       image_size_of(model), notes)


@dataclass
class _Load:
    """One pretrained load: what it goes into, where it comes from, and how to treat it."""

    name: str  # the model built (with SigLIP's logit_bias where --siglip added it)
    tags_of: str  # the model --model named, whose open_clip pretrained tags --pretrained may use
    spec: str
    trust: bool
    siglip: bool
    recorded: dict | None = None  # the model config the weights record, when already read


def forced_image_size(force: list[int] | None) -> int | tuple[int, int] | None:
    """``--force-image-size H [W]`` as open_clip's ``force_image_size`` takes it."""
    if not force:
        return None
    return force[0] if len(force) == 1 else tuple(force[:2])


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a resolved ``--precision`` (fp32, bf16, fp16)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def _with_logit_bias(name: str) -> str:
    """``name``, or a model registered beside it with SigLIP's ``logit_bias``: open_clip builds one
    only when the config has ``init_logit_bias``, and every later rebuild of this run's model
    (export check, WiSE-FT, the export's ``.model.json``) must have it too."""
    import open_clip

    from .pretrained import _write_model_config

    base_cfg = model_config(name)
    if base_cfg.get("init_logit_bias") is not None:
        return name
    stem = f"{name}-sigmoid"  # not "siglip": open_clip picks a (downloaded) SigLIP tokenizer for such names
    open_clip.add_model_config(_write_model_config(stem, {**base_cfg, **SIGLIP_INIT}))
    return stem


def _tag_preprocess(name: str, spec: str) -> dict:
    """An open_clip tag's preprocessing (mean, std, ...); nothing for files and directories."""
    if not spec or os.sep in spec or os.path.exists(os.path.expanduser(spec)):
        return {}
    from open_clip import pretrained as ocp

    return dict(ocp.get_pretrained_cfg(name, spec) or {})


def _preprocess_kwargs(pp: dict) -> dict[str, Any]:
    """open_clip's ``create_model_and_transforms`` arguments for a preprocess config."""
    names = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
             "resize_mode": "image_resize_mode"}
    return {arg: tuple(pp[k]) if isinstance(pp[k], list) else pp[k] for k, arg in names.items() if pp.get(k)}


def load_pretrained(model: nn.Module, load: _Load) -> list[str]:
    """Load weights from any supported source into ``model`` (before promotion); returns notes."""
    from .pretrained import load_pretrained_state_dict

    sd = load_pretrained_state_dict(load.spec, load.tags_of, trust=load.trust)
    sd = to_open_clip_shapes(sd, model.state_dict())
    notes = [f"loaded pretrained weights from {load.spec}"]
    notes += _fit_state_dict(sd, model, load)
    model.load_state_dict(sd, strict=True)
    return notes


def _fit_state_dict(sd: dict[str, torch.Tensor], ref: nn.Module, load: _Load) -> list[str]:
    """Make a checkpoint fit ``ref`` (the model, or a meta-device copy of it), in place: SigLIP's
    logit init where the checkpoint has none, positional embeddings resized from the checkpoint's
    own grid; then check every key.  Returns notes."""
    from .posembed import checkpoint_grid, resize_state_dict_pos_embeds
    from .pretrained import check_state_dict, recorded_model_config

    notes = _siglip_init_if_missing(sd, ref) if load.siglip else []
    try:
        recorded = load.recorded if load.recorded is not None else recorded_model_config(load.spec)
        grid = checkpoint_grid(sd, ref, [recorded, model_config(load.tags_of)])
        notes += resize_state_dict_pos_embeds(sd, ref, old_grid=grid)
    except ValueError as e:
        raise ConfigError(f"--pretrained {load.spec}: {e}") from None
    check_state_dict(ref, sd)
    return notes


def _siglip_init_if_missing(sd: dict[str, torch.Tensor], ref: nn.Module) -> list[str]:
    """A checkpoint without ``logit_bias`` was trained with InfoNCE: its temperature is a softmax
    one, and a sigmoid loss from ``scale 100, bias 0`` starts far off; both start at SigLIP's init."""
    expected = ref.state_dict()
    if "logit_bias" not in expected or "logit_bias" in sd:
        return []
    for key, init in (("logit_scale", "init_logit_scale"), ("logit_bias", "init_logit_bias")):
        sd[key] = torch.full(expected[key].shape, SIGLIP_INIT[init], dtype=torch.float32)
    note = (f"the checkpoint has no logit_bias (not a SigLIP checkpoint): logit_scale starts at ln(10), "
            f"logit_bias at {SIGLIP_INIT['init_logit_bias']:g} (SigLIP's init)")
    return [note]


def _meta_reference(name: str, create_kwargs: dict) -> nn.Module:
    """The model on the meta device: keys and shapes to check a checkpoint against, no memory."""
    import open_clip

    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, device="meta", **create_kwargs)


def _rank0_state_dict(load: _Load, create_kwargs: dict) -> tuple[dict, list[str]]:
    """Read, reshape, resize and check a checkpoint against a shapes-only (meta) model."""
    from .pretrained import load_pretrained_state_dict

    ref = _meta_reference(load.name, create_kwargs)
    sd = to_open_clip_shapes(load_pretrained_state_dict(load.spec, load.tags_of, trust=load.trust), ref.state_dict())
    notes = [f"loaded pretrained weights from {load.spec} (rank 0 reads, module by module)"]
    notes += _fit_state_dict(sd, ref, load)
    return sd, notes


def _rank0_first(work: Callable[[], tuple[Any, list[str]]]) -> tuple[Any, list[str]]:
    """Run ``work`` on rank 0 only; a ConfigError there is raised on every rank, not only rank 0."""
    import torch.distributed as dist

    result, notes, error = None, [], None
    if dist.get_rank() == 0:
        try:
            result, notes = work()
        except ConfigError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ConfigError(box[0])
    return result, notes


def load_pretrained_partitioned(model: nn.Module, load: _Load, create_kwargs: dict) -> list[str]:
    """Load weights into a ZeRO-3 partitioned model: only rank 0 reads the file; each module's
    parameters are gathered, filled by rank 0, and re-partitioned before the next module."""
    sd, notes = _rank0_first(lambda: _rank0_state_dict(load, create_kwargs))
    _copy_module_by_module(model, sd)
    return notes


def _load_image_tower_partitioned(model: nn.Module, name: str, spec: str, trust: bool,
                                  create_kwargs: dict) -> list[str]:
    """LiT under ZeRO-3: rank 0 reads the timm weights (checked against a meta copy of the trunk),
    then the trunk is filled module by module like the whole model is."""
    from .pretrained import image_tower_state_dict, timm_trunk

    trunk = timm_trunk(model)
    sd, notes = _rank0_first(lambda: image_tower_state_dict(timm_trunk(_meta_reference(name, create_kwargs)),
                                                            spec, trust))
    _copy_module_by_module(trunk, sd)
    return notes


def _copy_module_by_module(root: nn.Module, sd: dict[str, torch.Tensor] | None) -> None:
    """Copy rank 0's ``sd`` (keys relative to ``root``; None on other ranks) into a partitioned
    ``root``: one module's parameters gathered at a time, so the full model never exists on a rank.
    Collective: every rank calls it."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank()
    persistent = set(root.state_dict().keys()) if rank == 0 else None
    for mod_name, module in root.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        params = list(module.named_parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        for n, p in params:
                            p.data.copy_(sd[prefix + n].reshape(p.shape))
        for n, buf in module.named_buffers(recurse=False):  # buffers are not partitioned
            flag = [rank == 0 and prefix + n in persistent and prefix + n in sd]
            dist.broadcast_object_list(flag, src=0)
            if flag[0]:
                if rank == 0:
                    buf.copy_(sd[prefix + n])
                dist.broadcast(buf, src=0)


@contextlib.contextmanager
def _promote_scalars_at_init():
    """zero.Init broadcasts each module's parameters as bytes right after its ``__init__``, which
    fails on 0-dim ones; promote them inside the model's own ``__init__``, before that happens."""
    import open_clip

    classes = [c for c in (getattr(open_clip, n, None) for n in ("CLIP", "CustomTextCLIP", "CoCa")) if c]
    saved = {c: c.__init__ for c in classes}

    def wrap(orig):
        @functools.wraps(orig)
        def init(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            promote_scalar_params(self)

        return init

    for c in classes:
        c.__init__ = wrap(saved[c])
    try:
        yield
    finally:
        for c, f in saved.items():
            c.__init__ = f


def to_open_clip_shapes(sd: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reshape tensors whose element count matches the reference but whose shape does not (the
    1-element parameters DeepSpeed saw vs open_clip's 0-dim ones)."""
    out = dict(sd)
    for k, v in sd.items():
        ref = reference.get(k)
        if ref is not None and v.shape != ref.shape and v.numel() == ref.numel() and v.numel() == 1:
            out[k] = v.reshape(ref.shape)
    return out


def promote_scalar_params(model: nn.Module) -> list[str]:
    """Replace every 0-dim parameter by a 1-element one, keeping open_clip's shapes at the
    state-dict boundary.  Forward results are unchanged: ``[1]`` broadcasts where ``[]`` did."""
    promoted: list[str] = []
    for mod_name, module in model.named_modules():
        scalars = [n for n, p in module.named_parameters(recurse=False) if p.dim() == 0]
        if not scalars:
            continue
        for n in scalars:
            old = getattr(module, n)
            setattr(module, n, nn.Parameter(old.detach().reshape(1).clone(), requires_grad=old.requires_grad))
            promoted.append(f"{mod_name}.{n}" if mod_name else n)
        module._register_state_dict_hook(_make_squeeze_hook(scalars))
        module._register_load_state_dict_pre_hook(_make_unsqueeze_hook(scalars))
    model._dsclip_promoted = promoted  # type: ignore[attr-defined]
    return promoted


def _make_squeeze_hook(names: list[str]):
    def hook(module, state_dict, prefix, local_metadata):
        for n in names:
            key = prefix + n
            if key in state_dict and state_dict[key].shape == (1,):
                state_dict[key] = state_dict[key].reshape(())
        return state_dict

    return hook


def _make_unsqueeze_hook(names: list[str]):
    def hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for n in names:
            key = prefix + n
            if key in state_dict and state_dict[key].dim() == 0:
                state_dict[key] = state_dict[key].reshape(1)

    return hook


def clamp_logit_scale(model: nn.Module, max_value: float) -> None:
    """Clamp ``logit_scale`` to [0, max_value] in the working copy and, under ZeRO, in the fp32
    master copy, which otherwise overwrites the clamp at the next step.  Collective under ZeRO-3:
    every rank calls it after each optimizer step."""
    p = getattr(model, "logit_scale", None)
    if p is None or not p.requires_grad:
        return
    with torch.no_grad():
        if hasattr(p, "ds_id"):
            _clamp_partitioned(p, max_value)
            return
        value = float(p.data.reshape(-1)[0])
        if 0.0 <= value <= max_value:
            return
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, torch.full(p.shape, min(max(value, 0.0), max_value), dtype=torch.float32,
                                               device=p.device))
        p.data.clamp_(0.0, max_value)


def _clamp_partitioned(p: nn.Parameter, max_value: float) -> None:
    """ZeRO-3: the working copy may be partitioned away entirely (``p.data`` empty below the
    persistence threshold), so the value is read from the fp32 master, which every rank gets."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    master = safe_get_full_fp32_param(p)  # all-gathers the master's partitions
    if master is None:
        return
    value = float(master.reshape(-1)[0])
    if 0.0 <= value <= max_value:
        return
    rank = dist.get_rank(group=getattr(p, "ds_process_group", None))
    # DeepSpeed's setter slices this rank's share out of the full value, past its end on a rank
    # whose share of a 1-element parameter is only padding: only the owning rank writes.
    if p.partition_numel() * rank < p.ds_numel:
        safe_set_full_fp32_param(p, master.clamp(0.0, max_value).to(torch.float32))
    p.ds_tensor.data.clamp_(0.0, max_value)  # this rank's partition of the working copy
    if p.data.numel():  # a persistent (never released) parameter also holds the full copy
        p.data.clamp_(0.0, max_value)
