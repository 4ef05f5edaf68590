"""Freezing rules and parameter groups.

A strategy decides which parameters train; the parameter groups decide how they train.  Both are
built from a :class:`TowerLayout` per tower: the tower's lock groups in bottom-to-top order (the
same boundaries as open_clip's ``lock`` methods, so ``--lock-image-unlocked-groups N`` means the
same thing here) and a layer id per parameter for layer-wise LR decay (EVA-CLIP style: embeddings
are layer 0, block ``i`` is layer ``i + 1``, everything above the last block is ``L + 1``).

Freezing is our own: open_clip's ``lock_text_tower`` asserts ``freeze_layer_norm`` although the
flag defaults to off, and ``logit_scale`` could not be frozen at all.

The trainer calls, on every rank and before ``deepspeed.initialize``::

    apply_strategy_defaults(cfg)          # lr / warmup / epochs the user left unset
    frozen = apply_strategy(model, cfg)   # requires_grad=False per strategy
    groups = param_groups_for(model, cfg) # -> deepspeed.initialize(model_parameters=groups)
    rows = describe_param_groups(model, groups, frozen)
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsclip.config import Config, ConfigError

# Recommended settings per strategy (the fine-tuning guide's table).  A frozen tower tolerates a
# larger lr; full fine-tuning needs a small one or it forgets the pretrained features.
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {"lr": 1e-5, "warmup": 1000, "epochs": 5},
    "partial": {"lr": 5e-5, "warmup": 1000, "epochs": 5},
    "lock-image": {"lr": 1e-4, "warmup": 1000, "epochs": 10},
    "lock-text": {"lr": 1e-4, "warmup": 1000, "epochs": 10},
    "lit": {"lr": 1e-4, "warmup": 1000, "epochs": 10},
}

# Names that never take weight decay besides 1-d tensors, biases and the model's own
# no_weight_decay() lists: position/class embeddings of every tower kind we build.
DEFAULT_NO_DECAY_GLOBS = (
    "*positional_embedding*",
    "*position_embeddings*",
    "*pos_embed*",
    "*class_embedding*",
    "*cls_token*",
    "*cls_emb*",
    "*dist_token*",
    "*reg_token*",
    "logit_scale",
    "logit_bias",
)


# ---------------------------------------------------------------------------------------------
# Tower layouts
# ---------------------------------------------------------------------------------------------


@dataclass
class TowerLayout:
    """How one tower's parameters are ordered, from the input upwards."""

    tower: str  # "image" | "text"
    kind: str  # "vit", "timm", "resnet", "text-transformer", "hf", "generic"
    groups: list[list[str]]  # lock groups, bottom to top; "unlocked N" unfreezes the last N
    layer_ids: dict[str, int]  # parameter name -> layer id for layer-wise lr decay
    num_layers: int  # L: layer ids run 0 .. L + 1
    always_trainable: set[str] = field(default_factory=set)  # heads a lock leaves trainable
    norm_params: set[str] = field(default_factory=set)  # LayerNorm parameters (freeze_layer_norm)
    modules: list[nn.Module] = field(default_factory=list)  # the tower's modules (BatchNorm freezing)

    def lr_scale(self, name: str, decay: float) -> float:
        if decay == 1.0:
            return 1.0
        return decay ** (self.num_layers + 1 - self.layer_ids[name])


class _Names:
    """Maps parameters and modules to their qualified names in the whole model."""

    def __init__(self, model: nn.Module):
        self.by_id = {id(p): n for n, p in model.named_parameters()}

    def __call__(self, *objs: Any) -> list[str]:
        out: list[str] = []
        for obj in objs:
            if obj is None:
                continue
            if isinstance(obj, nn.Parameter):
                if id(obj) in self.by_id:
                    out.append(self.by_id[id(obj)])
            elif isinstance(obj, nn.Module):
                out += [self.by_id[id(p)] for p in obj.parameters() if id(p) in self.by_id]
            elif isinstance(obj, (list, tuple)):
                out += self(*obj)
        return list(dict.fromkeys(out))


def _layout(tower: str, kind: str, parts: list, names: _Names, bottom: list[str],
            blocks: list[list[str]], top: list[list[str]], always: Iterable[str] = (),
            last_block_with_top: bool = True) -> TowerLayout:
    """Assemble a layout from [embeddings], blocks and head groups; leftovers join the top.

    open_clip's groups merge the last block with the final norm (``last_block_with_top``), so
    ``unlocked 1`` on a ViT trains only the projection and ``unlocked 2`` adds the last block.
    """
    always = list(always)
    covered = set(bottom) | {n for b in blocks for n in b} | {n for g in top for n in g} | set(always)
    leftovers = [n for n in names(*parts) if n not in covered]
    top = [list(g) for g in top if g]
    if leftovers:  # e.g. attention pooling: it sits between the last block and the projection
        if top:
            top[0] = leftovers + top[0]
        else:
            top = [leftovers]
    L = len(blocks)
    layer_ids = {n: 0 for n in bottom}
    for i, b in enumerate(blocks):
        layer_ids.update({n: i + 1 for n in b})
    for g in top:
        layer_ids.update({n: L + 1 for n in g})
    layer_ids.update({n: L + 1 for n in always})
    groups: list[list[str]] = [list(bottom)] if bottom else []
    if last_block_with_top and blocks and top:
        groups += [list(b) for b in blocks[:-1]] + [list(blocks[-1]) + top[0]] + top[1:]
    else:
        groups += [list(b) for b in blocks] + top
    modules = [m for m in parts if isinstance(m, nn.Module)]
    norms = {names.by_id[id(p)] for top_m in modules for m in top_m.modules() if isinstance(m, _NORMS)
             for p in m.parameters(recurse=False) if id(p) in names.by_id}
    # HF encoders name their norms LayerNorm but some implement them as custom modules
    norms |= {n for n in layer_ids if "LayerNorm" in n.split(".")}
    return TowerLayout(tower, kind, [g for g in groups if g], layer_ids, L, set(always), norms, modules)


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def _image_layout(model: nn.Module, names: _Names) -> TowerLayout | None:
    visual = getattr(model, "visual", None)
    if visual is None:
        return None
    cls = type(visual).__name__
    if hasattr(visual, "conv1") and hasattr(visual, "transformer") and hasattr(visual, "ln_post"):
        bottom = names(getattr(visual, "conv1", None), getattr(visual, "class_embedding", None),
                       getattr(visual, "positional_embedding", None), getattr(visual, "ln_pre", None),
                       getattr(visual, "patchnorm_pre_ln", None))
        blocks = [names(b) for b in visual.transformer.resblocks]
        top = [names(visual.ln_post), names(getattr(visual, "proj", None))]
        return _layout("image", "vit", [visual], names, bottom, blocks, top)
    if cls == "TimmModel" or hasattr(visual, "trunk"):
        return _timm_layout(visual, names)
    if hasattr(visual, "layer1") and hasattr(visual, "attnpool"):  # open_clip ModifiedResNet
        bottom = names(*[getattr(visual, a, None) for a in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")])
        blocks = [names(getattr(visual, f"layer{i}")) for i in range(1, 5)]
        return _layout("image", "resnet", [visual], names, bottom, blocks, [names(visual.attnpool)],
                       last_block_with_top=False)
    return _layout("image", "generic", [visual], names, [], [], [names(visual)])


def _timm_layout(visual: nn.Module, names: _Names) -> TowerLayout:
    """timm trunks: timm's own group_matcher gives the groups; open_clip's head stays trainable."""
    trunk = visual.trunk
    prefix = names.by_id[id(next(trunk.parameters()))].split("trunk.")[0] + "trunk."
    grouped: list[list[str]] = []
    try:
        from timm.models import group_parameters

        by_id = group_parameters(trunk, trunk.group_matcher())
        grouped = [[prefix + n for n in by_id[k]] for k in sorted(by_id)]
    except (AttributeError, NotImplementedError, ImportError):
        grouped = [names(trunk)]
    head = [n for n in names(visual) if not n.startswith(prefix)]
    if len(grouped) >= 2:
        bottom, blocks = grouped[0], grouped[1:-1]
        top = [grouped[-1]]
    else:
        bottom, blocks, top = [], [], grouped
    return _layout("image", "timm", [visual], names, bottom, blocks, top, always=head,
                   last_block_with_top=False)


def _text_layout(model: nn.Module, names: _Names) -> TowerLayout | None:
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "config") \
            and hasattr(text, "pooler"):
        return _hf_layout(text, names)
    owner = text if text is not None else model  # CLIP keeps the text tower's parts at top level
    transformer = getattr(owner, "transformer", None)
    if transformer is None or not hasattr(transformer, "resblocks"):
        if text is None:
            return None
        return _layout("text", "generic", [text], names, [], [], [names(text)])
    bottom = names(getattr(owner, "token_embedding", None), getattr(owner, "positional_embedding", None),
                   getattr(owner, "cls_emb", None))
    blocks = [names(b) for b in transformer.resblocks]
    top = [names(getattr(owner, "ln_final", None)), names(getattr(owner, "text_projection", None))]
    if text is not None:
        return _layout("text", "text-transformer", [text], names, bottom, blocks, top)
    # Standard CLIP: the text tower is a set of top-level attributes, not one module.
    parts = [getattr(owner, a, None) for a in ("token_embedding", "positional_embedding", "cls_emb",
                                                "transformer", "ln_final", "text_projection")]
    return _layout("text", "text-transformer", [p for p in parts if p is not None], names, bottom, blocks, top)


def _hf_layout(text: nn.Module, names: _Names) -> TowerLayout:
    """open_clip's HFTextEncoder: groups are [embeddings, *encoder layers]; the projection (new
    in most CLIP-with-HF-text models) always trains, as in open_clip's HFTextEncoder.lock."""
    from open_clip.hf_configs import arch_dict

    tf = text.transformer
    cfg_names = arch_dict.get(getattr(text.config, "model_type", ""), {}).get("config_names", {})
    emb_attr = cfg_names.get("token_embeddings_attr", "embeddings")
    layer_attr = cfg_names.get("layer_attr", "layer")
    encoder = getattr(tf, "encoder", tf)
    layers = getattr(encoder, layer_attr, None)
    if layers is None:
        return _layout("text", "generic", [text], names, [], [], [names(text)])
    bottom = names(getattr(tf, emb_attr, None))
    blocks = [names(b) for b in layers]
    in_tf = set(names(tf))
    rest_tf = [n for n in names(tf) if n not in set(bottom) | {x for b in blocks for x in b}]
    head = [n for n in names(text) if n not in in_tf]
    # The transformer's remaining parts (pooler, final norm) belong with the last layer.
    if blocks:
        blocks[-1] = blocks[-1] + rest_tf
        rest_tf = []
    return _layout("text", "hf", [text], names, bottom, blocks, [rest_tf] if rest_tf else [], always=head,
                   last_block_with_top=False)


def tower_layouts(model: nn.Module) -> dict[str, TowerLayout]:
    """The image and text towers of an open_clip model (CLIP, CustomTextCLIP, CoCa)."""
    names = _Names(model)
    out: dict[str, TowerLayout] = {}
    img = _image_layout(model, names)
    if img is not None:
        out["image"] = img
    txt = _text_layout(model, names)
    if txt is not None:
        out["text"] = txt
    return out


def tower_of(layouts: dict[str, TowerLayout]) -> dict[str, str]:
    return {n: t for t, lay in layouts.items() for n in lay.layer_ids}


# ---------------------------------------------------------------------------------------------
# Strategy defaults and freezing
# ---------------------------------------------------------------------------------------------


def apply_strategy_defaults(cfg: Config) -> list[str]:
    """Fill lr / warmup / epochs from the strategy's recommendation where the user set none."""
    strategy = cfg.strategy.strategy
    if strategy not in STRATEGY_DEFAULTS:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGY_DEFAULTS)}")
    if strategy == "lit" and not (cfg.model.pretrained_image or cfg.model.pretrained):
        raise ConfigError("--strategy lit locks an ImageNet-pretrained image tower; give --pretrained-image "
                          "(a timm model name or a local timm checkpoint) or --pretrained")
    applied = []
    for key, value in STRATEGY_DEFAULTS[strategy].items():
        if cfg.is_set(f"optim.{key}") or getattr(cfg.optim, key) is not None:
            continue
        setattr(cfg.optim, key, value)
        applied.append(f"strategy {strategy}: {key} = {value:g} (recommended; set --{key} to override)")
    return applied


@dataclass
class LockPlan:
    """What to freeze, resolved from --strategy and open_clip's lock flags."""

    lock_image: bool
    image_unlocked: int
    freeze_bn_stats: bool
    lock_text: bool
    text_unlocked: int
    freeze_layer_norm: bool
    lock_logit_scale: bool


def lock_plan(cfg: Config) -> LockPlan:
    s = cfg.strategy
    name = s.strategy
    lock_image = s.lock_image or name in ("lock-image", "lit", "partial")
    lock_text = s.lock_text or name in ("lock-text", "partial")
    image_unlocked, text_unlocked = s.lock_image_unlocked_groups, s.lock_text_unlocked_layers
    if name == "partial":  # explicit open_clip flags win over the partial defaults
        if not cfg.is_set("strategy.lock_image_unlocked_groups"):
            image_unlocked = s.partial_unlocked_image_groups
        if not cfg.is_set("strategy.lock_text_unlocked_layers"):
            text_unlocked = s.partial_unlocked_text_layers
    if image_unlocked < 0 or text_unlocked < 0:
        raise ConfigError("unlocked group/layer counts must be >= 0")
    # unlocked counts only mean something for a locked tower; a silent no-op would train it all
    for flag, key, locked, lock_flag in (("--lock-image-unlocked-groups", "lock_image_unlocked_groups", lock_image,
                                          "--lock-image"),
                                         ("--lock-text-unlocked-layers", "lock_text_unlocked_layers", lock_text,
                                          "--lock-text")):
        if cfg.is_set(f"strategy.{key}") and getattr(s, key) and not locked:
            raise ConfigError(f"{flag} {getattr(s, key)} has no effect on an unlocked tower; add {lock_flag} "
                              f"(or a --strategy that locks it)")
    return LockPlan(lock_image, image_unlocked, s.lock_image_freeze_bn_stats, lock_text, text_unlocked,
                    s.lock_text_freeze_layer_norm, s.lock_logit_scale)


def _lock_tower(model: nn.Module, lay: TowerLayout, unlocked: int, keep_norms_trainable: bool) -> list[str]:
    params = dict(model.named_parameters())
    n_groups = len(lay.groups)
    if unlocked > n_groups:
        raise ConfigError(f"{lay.tower} tower has {n_groups} lock groups; cannot leave {unlocked} unlocked "
                          f"(use at most {n_groups}, or drop the lock)")
    locked_groups = lay.groups[: n_groups - unlocked]
    frozen = []
    for g in locked_groups:
        for n in g:
            if n in lay.always_trainable:
                continue
            if keep_norms_trainable and n in lay.norm_params:
                continue
            params[n].requires_grad = False
            frozen.append(n)
    return frozen


def apply_strategy(model: nn.Module, cfg: Config) -> list[str]:
    """Set requires_grad per the strategy; return the names of the frozen parameters."""
    plan = lock_plan(cfg)
    layouts = tower_layouts(model)
    for p in model.parameters():
        p.requires_grad = True
    frozen: list[str] = []
    if plan.lock_image:
        lay = layouts.get("image")
        if lay is None:
            raise ConfigError("--lock-image / this strategy needs a model with an image tower (model.visual)")
        frozen += _lock_tower(model, lay, plan.image_unlocked, keep_norms_trainable=False)
        if plan.freeze_bn_stats:
            for m in lay.modules:
                freeze_bn_stats(m, only_frozen=True)
    if plan.lock_text:
        lay = layouts.get("text")
        if lay is None:
            raise ConfigError("--lock-text / this strategy needs a model with a text tower")
        frozen += _lock_tower(model, lay, plan.text_unlocked, keep_norms_trainable=not plan.freeze_layer_norm)
    params = dict(model.named_parameters())
    if plan.lock_logit_scale and "logit_scale" in params:
        params["logit_scale"].requires_grad = False
        frozen.append("logit_scale")
    return frozen


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics
# ---------------------------------------------------------------------------------------------


def _keep_bn_in_eval(module: nn.Module, args: tuple) -> None:
    # Runs before every forward, so a later model.train() cannot switch the running stats back on.
    module.training = False


def freeze_bn_stats(module: nn.Module, only_frozen: bool = False) -> list[str]:
    """Stop BatchNorm running-stat updates in ``module`` for good (survives ``model.train()``).

    With ``only_frozen`` only BatchNorm layers whose own parameters are all frozen are affected
    (the locked part of a partially unlocked tower).  Returns the affected module names.
    """
    done = []
    for name, m in module.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        own = list(m.parameters(recurse=False))
        if only_frozen and any(p.requires_grad for p in own):
            continue
        if not getattr(m, "_dsclip_bn_frozen", False):
            m.register_forward_pre_hook(_keep_bn_in_eval)
            m._dsclip_bn_frozen = True
        m.eval()
        done.append(name)
    return done


# ---------------------------------------------------------------------------------------------
# Parameter groups
# ---------------------------------------------------------------------------------------------


def _shape(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", None) or p.shape  # ZeRO-3 partitions hold a [0] placeholder


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", 0) or p.numel())


def no_decay_names(model: nn.Module, extra_globs: Iterable[str] = ()) -> set[str]:
    """Parameters that take no weight decay.

    1-d tensors (biases, norm scales, logit_scale, class embeddings), names ending in ``.bias``,
    positional/class embeddings, the model's and its towers' ``no_weight_decay()`` lists, and
    any name matching one of ``extra_globs`` (``--wd-exclude``).
    """
    names = dict(model.named_parameters())
    out = {n for n, p in names.items() if len(_shape(p)) < 2 or n.endswith(".bias")}
    globs = list(DEFAULT_NO_DECAY_GLOBS) + list(extra_globs)
    out |= {n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    for prefix, mod in _no_wd_owners(model):
        try:
            listed = mod.no_weight_decay() or ()
        except Exception:  # noqa: BLE001 - a tower's helper may need state we lack; rules above suffice
            listed = ()
        for n in listed:
            full = prefix + n
            out |= {k for k in names if k == full or k.startswith(full + ".")}
    return out


def _no_wd_owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    owners = []
    for name, mod in model.named_modules():
        if callable(getattr(mod, "no_weight_decay", None)):
            owners.append((name + "." if name else "", mod))
    return owners


def _tower_settings(cfg: Config) -> dict[str, tuple[float, float, float]]:
    """(lr, wd, layer decay) per tower."""
    o = cfg.optim
    base_lr = o.lr if o.lr is not None else STRATEGY_DEFAULTS[cfg.strategy.strategy]["lr"]
    for key in ("image_layer_decay", "text_layer_decay"):
        v = getattr(o, key)
        if not 0.0 < v <= 1.0:
            raise ConfigError(f"--{key.replace('_', '-')} must be in (0, 1], got {v}")
    return {
        "image": (o.image_lr if o.image_lr is not None else base_lr,
                  o.image_wd if o.image_wd is not None else o.wd, o.image_layer_decay),
        "text": (o.text_lr if o.text_lr is not None else base_lr,
                 o.text_wd if o.text_wd is not None else o.wd, o.text_layer_decay),
        "other": (base_lr, o.wd, 1.0),
    }


def param_groups_for(model: nn.Module, cfg: Config) -> list[dict]:
    """Optimizer parameter groups for ``deepspeed.initialize(model_parameters=...)``.

    One group per (tower, layer-decay scale, decay/no-decay).  Each group's ``lr`` already holds
    the tower lr times the layer-decay scale, because the LR scheduler scales every group's own
    initial lr.  Frozen parameters are left out and empty groups are never emitted (DeepSpeed
    drops them, which would shift group indices).
    """
    layouts = tower_layouts(model)
    towers = tower_of(layouts)
    settings = _tower_settings(cfg)
    no_decay = no_decay_names(model, cfg.optim.wd_exclude)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = towers.get(name, "other")
        lr, wd, decay = settings[tower]
        scale = layouts[tower].lr_scale(name, decay) if tower in layouts else 1.0
        use_wd = 0.0 if name in no_decay else wd
        key = (tower, round(scale, 12), use_wd == 0.0)
        if key not in groups:
            layer = ""
            if decay != 1.0 and tower in layouts:
                layer = f"_L{layouts[tower].layer_ids[name]:02d}"
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": use_wd,
                           "name": f"{tower}{layer}_{'no_decay' if use_wd == 0.0 else 'decay'}",
                           "tower": tower, "lr_scale": scale}
        groups[key]["params"].append(p)
    order = {"image": 0, "text": 1, "other": 2}
    out = sorted(groups.values(), key=lambda g: (order[g["tower"]], g["lr_scale"], g["weight_decay"] == 0.0))
    return [g for g in out if g["params"]]


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _ranges(ids: Iterable[int]) -> str:
    ids = sorted(set(ids))
    if not ids:
        return "-"
    parts, start, prev = [], ids[0], ids[0]
    for i in ids[1:] + [math.inf]:
        if i != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = i
        prev = i
    return ",".join(parts)


def describe_param_groups(model: nn.Module, groups: list[dict], frozen: list[str]) -> list[dict]:
    """One row per optimizer group plus one per tower with frozen parameters."""
    layouts = tower_layouts(model)
    towers = tower_of(layouts)
    name_of = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    rows = []
    for g in groups:
        names = [name_of.get(id(p), "?") for p in g["params"]]
        t = g.get("tower", "other")
        ids = [layouts[t].layer_ids[n] for n in names if t in layouts and n in layouts[t].layer_ids]
        rows.append({"group": g.get("name", "?"), "tower": t, "layers": _ranges(ids),
                     "tensors": len(names), "params": sum(_numel(p) for p in g["params"]),
                     "lr": g["lr"], "wd": g.get("weight_decay", 0.0), "frozen": False, "names": names})
    by_tower: dict[str, list[str]] = {}
    for n in frozen:
        by_tower.setdefault(towers.get(n, "other"), []).append(n)
    for t, names in by_tower.items():
        ids = [layouts[t].layer_ids[n] for n in names if t in layouts]
        rows.append({"group": f"{t}_frozen", "tower": t, "layers": _ranges(ids), "tensors": len(names),
                     "params": sum(_numel(params[n]) for n in names if n in params), "lr": 0.0, "wd": 0.0,
                     "frozen": True, "names": names})
    return rows


def format_param_group_table(rows: list[dict]) -> str:
    head = ("group", "tower", "layers", "tensors", "params", "lr", "wd", "frozen")
    cells = [head]
    for r in rows:
        cells.append((r["group"], r["tower"], r["layers"], str(r["tensors"]), f"{r['params']:,}",
                      f"{r['lr']:.3g}", f"{r['wd']:g}", "yes" if r["frozen"] else "no"))
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    right = {3, 4, 5, 6}
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(c[i].rjust(widths[i]) if i in right else c[i].ljust(widths[i])
                               for i in range(len(head))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    total = sum(r["params"] for r in rows)
    trainable = sum(r["params"] for r in rows if not r["frozen"])
    lines.append(f"trainable {trainable:,} of {total:,} parameters ({100.0 * trainable / max(total, 1):.1f}%)")
    return "\n".join(lines)
