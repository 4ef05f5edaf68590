"""``dsclip plan``: estimate per-rank memory before a run, and refuse plans that cannot fit.

Model states follow ZeRO's accounting (what DeepSpeed's estimators count): with P parameters,
T of them trainable and W ranks,

  params     4P (fp32) or 2P (bf16/fp16), divided by W at stage 3
  gradients  4T or 2T, divided by W from stage 2
  optimizer  8T for Adam's moments (+4T fp32 master weights under bf16/fp16), divided by W from
             stage 1

Activations are estimated per transformer layer and sample, as in Korthikanti et al. (2022):
``s*h*(34 + 5*a*s/h)`` bytes in 16-bit for sequence s, width h and a heads (twice that in fp32);
with gradient checkpointing only each layer's input (2*s*h) is kept, plus one layer live.  The
contrastive logits of the local loss add 3*b*B*4 bytes.  A fixed runtime overhead (framework and
communication buffers) completes the estimate; ``--overhead-gib`` overrides it.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

GIB = 1024**3


@dataclass
class Estimate:
    stage: int
    params: float
    grads: float
    optimizer: float
    activations: float
    activations_ckpt: float
    logits: float
    overhead: float
    total: float

    def row(self) -> str:
        g = {k: v / GIB for k, v in asdict(self).items() if k != "stage"}
        return (f"ZeRO-{self.stage}  params {g['params']:7.2f}  grads {g['grads']:7.2f}  optim {g['optimizer']:7.2f}  "
                f"act {g['activations']:7.2f} (ckpt {g['activations_ckpt']:6.2f})  logits {g['logits']:5.2f}  "
                f"total {g['total']:7.2f} GiB")


@dataclass
class ModelShape:
    params: int
    trainable: int
    towers: list[tuple[int, int, int, int]]  # (layers, seq len, width, heads) per tower


def model_shape(cfg) -> ModelShape:
    """Parameter counts after the strategy's freezing, from a model built on the meta device."""
    import open_clip
    import torch

    from .model import register_model
    from .strategies import apply_strategy, apply_strategy_defaults

    apply_strategy_defaults(cfg)
    name = register_model(cfg.model.model)
    force = cfg.model.force_image_size
    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta",
                                       force_image_size=None if not force else
                                       (force[0] if len(force) == 1 else tuple(force[:2])))
    apply_strategy(model, cfg)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    towers = []
    v = model.visual
    if hasattr(v, "transformer") and hasattr(v, "grid_size"):
        gh, gw = v.grid_size if isinstance(v.grid_size, tuple) else (v.grid_size, v.grid_size)
        blocks = v.transformer.resblocks
        towers.append((len(blocks), gh * gw + 1, v.transformer.width, blocks[0].attn.num_heads))
    if hasattr(model, "transformer"):
        blocks = model.transformer.resblocks
        towers.append((len(blocks), model.context_length, model.transformer.width, blocks[0].attn.num_heads))
    return ModelShape(params, trainable, towers)


def estimate(shape: ModelShape, stage: int, precision: str, batch: int, world: int,
             overhead_gib: float = 1.0) -> Estimate:
    p_bytes = 4 if precision == "fp32" else 2
    master = 0 if precision == "fp32" else 4
    P, T, W = shape.params, shape.trainable, world
    params = p_bytes * P / (W if stage >= 3 else 1)
    grads = p_bytes * T / (W if stage >= 2 else 1)
    optim = (8 + master) * T / (W if stage >= 1 else 1)
    act = act_ckpt = 0.0
    scale = 2 if precision == "fp32" else 1
    for layers, s, h, a in shape.towers:
        per_layer = s * h * (34 + 5 * a * s / h) * scale
        act += batch * layers * per_layer
        act_ckpt += batch * (layers * 2 * s * h * scale + per_layer)
    logits = 3 * batch * batch * world * 4
    overhead = overhead_gib * GIB
    total = params + grads + optim + act + logits + overhead
    return Estimate(stage, params, grads, optim, act, act_ckpt, logits, overhead, total)


def fits(e: Estimate, budget_gib: float, grad_ckpt: bool) -> bool:
    act = e.activations_ckpt if grad_ckpt else e.activations
    return e.total - e.activations + act <= budget_gib * GIB


def largest_batch(shape: ModelShape, stage: int, precision: str, world: int, budget_gib: float,
                  grad_ckpt: bool, overhead_gib: float) -> int:
    lo, hi = 0, 1
    while fits(estimate(shape, stage, precision, hi, world, overhead_gib), budget_gib, grad_ckpt) and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(estimate(shape, stage, precision, mid, world, overhead_gib), budget_gib, grad_ckpt):
            lo = mid
        else:
            hi = mid
    return lo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsclip plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name or model-config JSON")
    p.add_argument("--strategy", default="full", choices=("full", "lock-image", "lock-text", "partial", "lit"))
    p.add_argument("--zero-stage", type=int, default=None, choices=(0, 1, 2, 3), help="default: compare all")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--world-size", type=int, default=8)
    p.add_argument("--device-memory", type=float, default=80.0, help="GiB per rank")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--force-image-size", type=int, nargs="+", default=None)
    p.add_argument("--overhead-gib", type=float, default=1.0, help="framework and buffer overhead per rank")
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, parse_args

    a = build_parser().parse_args(argv)
    try:
        flags = ["--model", a.model, "--strategy", a.strategy]
        if a.force_image_size:
            flags += ["--force-image-size", *map(str, a.force_image_size)]
        shape = model_shape(parse_args(flags))
    except ConfigError as e:
        print(f"dsclip plan: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.model}: {shape.params / 1e6:.1f}M params, {shape.trainable / 1e6:.1f}M trainable ({a.strategy}); "
          f"{a.precision}, batch {a.batch_size}/rank x {a.world_size} ranks, budget {a.device_memory:g} GiB/rank")
    stages = [a.zero_stage] if a.zero_stage is not None else [0, 1, 2, 3]
    chosen = None
    for st in stages:
        e = estimate(shape, st, a.precision, a.batch_size, a.world_size, a.overhead_gib)
        ok = fits(e, a.device_memory, a.grad_checkpointing)
        best = largest_batch(shape, st, a.precision, a.world_size, a.device_memory, a.grad_checkpointing,
                             a.overhead_gib)
        print(f"  {e.row()}  {'fits' if ok else 'DOES NOT FIT'}; largest batch/rank {best}")
        if ok and chosen is None:
            chosen = st
    if chosen is None:
        print(f"no ZeRO stage fits batch {a.batch_size}/rank in {a.device_memory:g} GiB; lower --batch-size, add "
              f"--grad-checkpointing, use more ranks, or offload (ds_configs/zero3_offload.json)")
        return 1
    print(f"recommended: ZeRO-{chosen} (ds_configs/zero{chosen}.json) at batch {a.batch_size}/rank")
    return 0


def check_fits(cfg, stage: int, precision: str, world: int, budget_gib: float, overhead_gib: float = 1.0) -> None:
    """Raise ConfigError before any model is built when the plan cannot fit ``budget_gib``."""
    from .config import ConfigError

    shape = model_shape(cfg)
    e = estimate(shape, stage, precision, cfg.optim.batch_size, world, overhead_gib)
    if not fits(e, budget_gib, cfg.model.grad_checkpointing):
        raise ConfigError(f"estimated {e.total / GIB:.1f} GiB per rank at ZeRO-{stage} exceeds the "
                          f"{budget_gib:.1f} GiB available; use ZeRO-3 (ds_configs/zero3.json), a smaller "
                          f"--batch-size or --grad-checkpointing (see `dsclip plan`)")
