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
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import Config, ConfigError


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
    """Return an open_clip model name for ``--model``; a JSON path is registered under its stem."""
    import open_clip

    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise ConfigError(f"model config not found: {model}; pass an existing open_clip model-config JSON "
                              f"or a model name from `open_clip.list_models()`")
        open_clip.add_model_config(model)
        return os.path.splitext(os.path.basename(model))[0]
    if model.startswith(("hf-hub:", "local-dir:")):
        return model
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
    """Build the open_clip model named by ``cfg.model``, load ``--pretrained`` (resizing positional
    embeddings to a forced image size or context length), and make it DeepSpeed-safe.

    With ``zero3_config`` the model is built inside ``deepspeed.zero.Init``: every module is
    partitioned as soon as it is constructed, so no rank ever holds the whole model, and weights
    are loaded module by module from rank 0."""
    import open_clip

    m = cfg.model
    name = register_model(m.model)
    force_size = None
    if m.force_image_size:
        force_size = m.force_image_size[0] if len(m.force_image_size) == 1 else tuple(m.force_image_size[:2])
    kwargs: dict[str, Any] = {"force_image_size": force_size, "force_context_length": m.force_context_length,
                              "force_patch_dropout": m.force_patch_dropout, "output_dict": True}
    if m.pretrained or not load_weights:  # CLIP weights replace a HF text tower's own: don't download them
        kwargs["pretrained_text"] = False
    notes: list[str] = []
    if zero3_config is not None:
        import deepspeed

        with _promote_scalars_at_init(), deepspeed.zero.Init(config_dict_or_path=zero3_config):
            model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
                name, pretrained=None, device="cpu", **kwargs)
        notes.append("built partitioned (deepspeed.zero.Init)")
        if load_weights and m.pretrained:
            notes += load_pretrained_partitioned(model, name, m.pretrained, m.trust_checkpoint, kwargs)
        if load_weights and m.pretrained_image:
            notes += _load_image_tower_partitioned(model, m.pretrained_image, m.trust_checkpoint)
    else:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, device="cpu", **kwargs)
        if load_weights and m.pretrained:
            notes += load_pretrained(model, name, m.pretrained, trust=m.trust_checkpoint)
        if load_weights and m.pretrained_image:  # LiT: ImageNet weights for the image tower
            from .pretrained import load_pretrained_image

            notes += load_pretrained_image(model, m.pretrained_image, trust=m.trust_checkpoint)
    if m.grad_checkpointing:
        model.set_grad_checkpointing(True)
    built_cfg = model_config(name) if not name.startswith(("hf-hub:", "local-dir:")) else {}
    if built_cfg:
        if force_size is not None:
            built_cfg["vision_cfg"]["image_size"] = force_size if isinstance(force_size, int) else list(force_size)
        if m.force_context_length:
            built_cfg["text_cfg"]["context_length"] = m.force_context_length
    if zero3_config is None:
        promote_scalar_params(model)
    tokenizer = open_clip.get_tokenizer(name, context_length=m.force_context_length) \
        if m.force_context_length else open_clip.get_tokenizer(name)
    return ModelBundle(model.to(device), name, built_cfg, preprocess_train, preprocess_val, tokenizer,
                       image_size_of(model), notes)


def load_pretrained(model: nn.Module, name: str, spec: str, trust: bool = False) -> list[str]:
    """Load weights from any supported source into ``model`` (before promotion); returns notes."""
    from .posembed import resize_state_dict_pos_embeds
    from .pretrained import check_state_dict, load_pretrained_state_dict

    sd = load_pretrained_state_dict(spec, name, trust=trust)
    sd = to_open_clip_shapes(sd, model.state_dict())
    notes = [f"loaded pretrained weights from {spec}"]
    notes += resize_state_dict_pos_embeds(sd, model)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
    return notes


def _rank0_state_dict(name: str, spec: str, trust: bool, create_kwargs: dict) -> tuple[dict, list[str]]:
    """Read, reshape, resize and check a checkpoint against a shapes-only (meta) model."""
    import open_clip

    from .posembed import resize_state_dict_pos_embeds
    from .pretrained import check_state_dict, load_pretrained_state_dict

    with torch.device("meta"):
        ref = open_clip.create_model(name, pretrained=None, device="meta", **create_kwargs)
    sd = to_open_clip_shapes(load_pretrained_state_dict(spec, name, trust=trust), ref.state_dict())
    notes = [f"loaded pretrained weights from {spec} (rank 0 reads, module by module)"]
    notes += resize_state_dict_pos_embeds(sd, ref)
    check_state_dict(ref, sd)
    return sd, notes


def load_pretrained_partitioned(model: nn.Module, name: str, spec: str, trust: bool,
                                create_kwargs: dict) -> list[str]:
    """Load weights into a ZeRO-3 partitioned model: only rank 0 reads the file; each module's
    parameters are gathered, filled by rank 0, and re-partitioned before the next module."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank()
    sd, notes, error = None, [], None
    if rank == 0:
        try:
            sd, notes = _rank0_state_dict(name, spec, trust, create_kwargs)
        except ConfigError as e:
            error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)  # every rank fails together, not only rank 0
    if box[0] is not None:
        raise ConfigError(box[0])
    persistent = set(model.state_dict().keys()) if rank == 0 else None
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        params = list(module.named_parameters(recurse=False))
        if params:
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        for n, p in params:
                            p.data.copy_(sd[prefix + n].reshape(p.shape))
        for n, buf in module.named_buffers(recurse=False):
            flag = [rank == 0 and prefix + n in persistent and prefix + n in sd]
            dist.broadcast_object_list(flag, src=0)
            if flag[0]:
                if rank == 0:
                    buf.copy_(sd[prefix + n])
                dist.broadcast(buf, src=0)
    return notes


def _load_image_tower_partitioned(model: nn.Module, spec: str, trust: bool) -> list[str]:
    """LiT under ZeRO-3: gather the image tower, let rank 0 load its timm weights, re-partition."""
    import deepspeed
    import torch.distributed as dist

    from .pretrained import load_pretrained_image

    notes, error = [], None
    with deepspeed.zero.GatheredParameters(list(model.visual.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            try:
                notes = load_pretrained_image(model, spec, trust=trust)
            except ConfigError as e:
                error = str(e)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise ConfigError(box[0])
    for buf in model.visual.buffers():  # BatchNorm statistics are not partitioned
        dist.broadcast(buf, src=0)
    return notes


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
    master copy, which otherwise overwrites the clamp at the next step."""
    p = getattr(model, "logit_scale", None)
    if p is None or not p.requires_grad:
        return
    with torch.no_grad():
        value = float(p.data.reshape(-1)[0]) if p.data.numel() else None
        if value is None or 0.0 <= value <= max_value:
            return
        from deepspeed.utils import safe_set_full_fp32_param

        clamped = torch.full(p.ds_shape if hasattr(p, "ds_shape") else p.shape, min(max(value, 0.0), max_value),
                             dtype=torch.float32, device=p.device)
        safe_set_full_fp32_param(p, clamped)
        p.data.clamp_(0.0, max_value)
