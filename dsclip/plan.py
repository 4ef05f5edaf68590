"""``dsclip plan``: estimate per-rank memory before a run, and refuse plans that cannot fit.

Model states use ZeRO's accounting.  For 16-bit training they are DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``): 2 bytes
per parameter for the 16-bit weights, plus 18 bytes per trainable parameter (16-bit and fp32
gradients, fp32 master weights, Adam's two moments) divided over the ranks, plus at stage 3 the
largest layer gathered in full.  Frozen parameters cost only their weights (dsclip keeps them out
of the optimizer).  fp32 training: 4 bytes of weights, 4 of gradients and 8 of Adam moments per
trainable parameter, partitioned from stage 1 (moments), 2 (gradients) and 3 (weights); ZeRO-1
and ZeRO-2 also clone each rank's partition as the "master" copy (4 bytes / ranks), while ZeRO-3
and stage 0 update the fp32 weights in place.  Stages 0 and 1, which DeepSpeed has no estimator for, follow the same accounting.

Activations are not guessed from a formula: the model is built on the meta device (no memory, no
weights) and run forward at batch 1 and 3 under ``saved_tensors_hooks``, which sees every tensor
autograd keeps for backward; the difference is the per-sample cost, for any tower (ViT, timm,
Hugging Face).  With gradient checkpointing the same measurement gives the kept layer inputs,
plus one layer recomputed at a time.  The local contrastive loss adds its logits (b x B, fp32).
DeepSpeed's gradient communication buffers (see ``comm_buffers``) and a fixed runtime overhead
(gloo/NCCL buffers, allocator slack) complete the estimate.

Accuracy: the total is what training adds to a rank whose framework is loaded.  Against the peak
RSS growth of 2 CPU ranks (fp32, gradient checkpointing; benchmarks/results/scale.md) it was
+7% for ViT-B-32 at ZeRO-0, +1% at ZeRO-3 (batch 4) and -2% for ViT-H-14 at ZeRO-3 (batch 1);
tests/test_plan.py holds the ZeRO-3 case to 20%.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

GIB = 1024**3
# per rank, on top of what the estimate counts: DeepSpeed's buckets, gloo/NCCL buffers, allocator
# slack.  The trainer's up-front check measures the budget after the framework is loaded.
RUNTIME_OVERHEAD_GIB = 0.25
DS_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default allreduce/reduce bucket (ZeRO-0/1/2), elements


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
    grad_ckpt: bool
    buffers: float = 0.0  # DeepSpeed's gradient communication buffers

    @property
    def total(self) -> float:
        act = self.activations_ckpt if self.grad_ckpt else self.activations
        return self.params + self.grads + self.optimizer + act + self.logits + self.buffers + self.overhead

    @property
    def training_state(self) -> float:
        """What training adds to a process that has the framework loaded (total less overhead)."""
        return self.total - self.overhead

    def row(self) -> str:
        g = {k: v / GIB for k, v in asdict(self).items() if k not in ("stage", "grad_ckpt")}
        return (f"ZeRO-{self.stage}  params {g['params']:7.2f}  grads {g['grads']:7.2f}  optim {g['optimizer']:7.2f}  "
                f"act {g['activations']:7.2f} (ckpt {g['activations_ckpt']:6.2f})  logits {g['logits']:5.2f}  "
                f"buffers {g['buffers']:5.2f}  total {self.total / GIB:7.2f} GiB")


@dataclass
class ModelShape:
    params: int
    trainable: int
    largest_layer: int  # parameters of the largest module: ZeRO-3 gathers one at a time
    act_per_sample: float  # bytes autograd keeps for backward, per sample
    act_ckpt_per_sample: float  # the same with gradient checkpointing (kept inputs + one live layer)


def _saved_bytes(forward, batch: int) -> int:
    """Bytes of the tensors autograd saves for backward in ``forward(batch)`` (meta device)."""
    import torch

    seen: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t  # views share their base's memory
        seen[id(base)] = base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(batch)
    return sum(seen.values())


def _per_sample(forward) -> float:
    one, three = (_saved_bytes(forward, b) for b in (1, 3))
    return max(0.0, (three - one) / 2)  # batch-independent saves (weights) cancel out


def _hf_text_formula(text_tower, context_length: int, bytes_per_value: int) -> float:
    """Per-sample activations of a Hugging Face text encoder from its config (Korthikanti et al.
    2022), for towers whose forward cannot run on the meta device (data-dependent checks)."""
    c = text_tower.config
    s, h, a = context_length, c.hidden_size, c.num_attention_heads
    return c.num_hidden_layers * s * h * (34 + 5 * a * s / h) * bytes_per_value / 2


def _tower_activations(model, image_size, context_length, dtype) -> float:
    import torch

    def image(b: int):
        model.encode_image(torch.empty(b, 3, *image_size, device="meta", dtype=dtype))

    def text(b: int):
        model.encode_text(torch.zeros(b, context_length, dtype=torch.long, device="meta"))

    total = _per_sample(image)
    try:
        total += _per_sample(text)
    except (RuntimeError, NotImplementedError):  # e.g. an HF tower's `.item()` on a mask
        text_tower = getattr(model, "text", None)
        if hasattr(getattr(text_tower, "transformer", None), "config"):
            total += _hf_text_formula(text_tower.transformer, context_length, dtype.itemsize)
    return total


def _num_layers(model) -> int:
    """Transformer blocks (or timm stages) that gradient checkpointing recomputes one at a time."""
    count = 0
    for m in model.modules():
        name = type(m).__name__
        if name in ("ResidualAttentionBlock", "Block", "RobertaLayer", "XLMRobertaLayer", "BertLayer"):
            count += 1
    return max(1, count)


def model_shape(cfg, precision: str = "fp32") -> ModelShape:
    """Parameter counts after the strategy's freezing and measured activation costs, from a model
    built on the meta device."""
    import open_clip
    import torch

    from .model import forced_image_size, precision_dtype, register_model
    from .strategies import apply_strategy, apply_strategy_defaults

    apply_strategy_defaults(cfg)
    name = register_model(cfg.model.model)
    with torch.device("meta"):
        # pretrained_text=False: an HF text tower must not load (or fetch) its weights onto meta
        model = open_clip.create_model(name, pretrained=None, device="meta", pretrained_text=False,
                                       force_image_size=forced_image_size(cfg.model.force_image_size),
                                       force_context_length=cfg.model.force_context_length,
                                       force_patch_dropout=cfg.model.force_patch_dropout)
    apply_strategy(model, cfg)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    size = getattr(model.visual, "image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    ctx = getattr(model, "context_length", None) or getattr(model.text, "context_length", 77)
    dtype = precision_dtype(precision)
    model = model.to(dtype).train()
    full = _tower_activations(model, size, ctx, dtype)
    model.set_grad_checkpointing(True)
    kept = _tower_activations(model, size, ctx, dtype)
    ckpt = kept + (full - kept) / _num_layers(model) if kept < full else full
    return ModelShape(params, trainable, largest, full, ckpt)


def model_states(shape: ModelShape, stage: int, precision: str, world: int) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per rank; see the module docstring."""
    P, T, W, L = shape.params, shape.trainable, world, shape.largest_layer
    F = P - T
    if precision == "fp32":
        weights = 4 * P / (W if stage >= 3 else 1) + (4 * L if stage >= 3 else 0)
        master = 4 * T / W if stage in (1, 2) else 0  # ZeRO-1/2 copy their partition even in fp32
        return weights, 4 * T / (W if stage >= 2 else 1), 8 * T / (W if stage >= 1 else 1) + master
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(T, num_gpus_per_node=W, cpu_offload=False)
        return 2 * T + 2 * F, 2 * T / W, gpu - 2 * T - 2 * T / W
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, largest = estimate_zero3_model_states_mem_needs(T, L, num_gpus_per_node=W, cpu_offload=False,
                                                                cpu_offload_params=False, zero_init=True)
        return largest + 2 * T / W + 2 * F / W, 2 * T / W, gpu - largest - 4 * T / W
    # stage 0 and 1: 16-bit weights and gradients replicated, fp32 master + moments (+fp32 grads)
    return 2 * P, 2 * T, 16 * T / (W if stage >= 1 else 1)


def estimate(shape: ModelShape, stage: int, precision: str, batch: int, world: int, grad_ckpt: bool = False,
             overhead_gib: float = RUNTIME_OVERHEAD_GIB) -> Estimate:
    weights, grads, optim = model_states(shape, stage, precision, world)
    logits = 2 * 3 * batch * batch * world * 4  # image and text logits, fp32, with softmax grads
    return Estimate(stage, weights, grads, optim, batch * shape.act_per_sample, batch * shape.act_ckpt_per_sample,
                    logits, overhead_gib * GIB, grad_ckpt, comm_buffers(shape, stage, precision))


def comm_buffers(shape: ModelShape, stage: int, precision: str) -> float:
    """Gradient bytes DeepSpeed holds for communication on top of the gradients themselves.
    ZeRO-0/1 flatten the gradients into allreduce buckets and ZeRO-2 copies them into its reduce
    bucket, up to the bucket size (5e8 elements by default; most CLIP models fit in one), so
    about one more gradient copy; ZeRO-3 reduces per bucket of its h^2 size, the largest
    layer's full gradient being the most it holds at once."""
    grad_bytes = 4 if precision == "fp32" else 2
    if stage == 3:
        return grad_bytes * shape.largest_layer
    return grad_bytes * min(shape.trainable, DS_BUCKET_ELEMENTS)


def largest_batch(shape: ModelShape, stage: int, precision: str, world: int, budget_gib: float,
                  grad_ckpt: bool, overhead_gib: float = RUNTIME_OVERHEAD_GIB) -> int:
    def ok(b: int) -> bool:
        return estimate(shape, stage, precision, b, world, grad_ckpt, overhead_gib).total <= budget_gib * GIB

    lo, hi = 0, 1
    while ok(hi) and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def recommend(shape: ModelShape, precision: str, batch: int, world: int, budget_gib: float, grad_ckpt: bool,
              overhead_gib: float = RUNTIME_OVERHEAD_GIB) -> str:
    """One line: the lowest stage that fits the batch, else the best reachable plan."""
    for st in (0, 1, 2, 3):
        if estimate(shape, st, precision, batch, world, grad_ckpt, overhead_gib).total <= budget_gib * GIB:
            return f"ZeRO-{st} (ds_configs/zero{st}.json) at batch {batch}/rank"
    options = []
    for ckpt in sorted({grad_ckpt, True}):
        best = largest_batch(shape, 3, precision, world, budget_gib, ckpt, overhead_gib)
        if best:
            options.append(f"ZeRO-3 at batch {best}/rank{' with --grad-checkpointing' if ckpt else ''}"
                           f"{' (--accum-freq ' + str(-(-batch // best)) + ' keeps the effective batch)' if best < batch else ''}")
    if options:
        return "; or ".join(options)
    return ("nothing fits: the model states alone exceed the budget at ZeRO-3; use more ranks or "
            "ds_configs/zero3_offload.json")


def check_fits(cfg, stage: int, precision: str, world: int, budget_gib: float,
               overhead_gib: float = RUNTIME_OVERHEAD_GIB) -> Estimate:
    """Raise ConfigError before any model is built when the plan cannot fit ``budget_gib``."""
    from .config import ConfigError

    shape = model_shape(cfg, precision)
    grad_ckpt = cfg.model.grad_checkpointing
    e = estimate(shape, stage, precision, cfg.optim.batch_size, world, grad_ckpt, overhead_gib)
    if e.total > budget_gib * GIB:
        advice = recommend(shape, precision, cfg.optim.batch_size, world, budget_gib, grad_ckpt, overhead_gib)
        raise ConfigError(f"estimated {e.total / GIB:.1f} GiB per rank at ZeRO-{stage} (batch "
                          f"{cfg.optim.batch_size}/rank) exceeds the {budget_gib:.1f} GiB available; "
                          f"try {advice} (details: `dsclip plan`; skip the check with --no-memory-check)")
    return e


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
    p.add_argument("--overhead-gib", type=float, default=1.0,
                   help="per-rank runtime overhead: CUDA context, NCCL and DeepSpeed buffers")
    return p


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, parse_args

    a = build_parser().parse_args(argv)
    try:
        flags = ["--model", a.model, "--strategy", a.strategy]
        if a.force_image_size:
            flags += ["--force-image-size", *map(str, a.force_image_size)]
        shape = model_shape(parse_args(flags), a.precision)
    except ConfigError as e:
        print(f"dsclip plan: error: {e}", file=sys.stderr)
        return 2
    print(f"{a.model}: {shape.params / 1e6:.1f}M params, {shape.trainable / 1e6:.1f}M trainable ({a.strategy}); "
          f"activations {shape.act_per_sample / 2**20:.1f} MiB/sample ({shape.act_ckpt_per_sample / 2**20:.1f} "
          f"with checkpointing); {a.precision}, batch {a.batch_size}/rank x {a.world_size} ranks, budget "
          f"{a.device_memory:g} GiB/rank")
    stages = [a.zero_stage] if a.zero_stage is not None else [0, 1, 2, 3]
    for st in stages:
        e = estimate(shape, st, a.precision, a.batch_size, a.world_size, a.grad_checkpointing, a.overhead_gib)
        best = largest_batch(shape, st, a.precision, a.world_size, a.device_memory, a.grad_checkpointing,
                             a.overhead_gib)
        fit = "fits" if e.total <= a.device_memory * GIB else "DOES NOT FIT"
        print(f"  {e.row()}  {fit}; largest batch/rank {best}")
    advice = recommend(shape, a.precision, a.batch_size, a.world_size, a.device_memory, a.grad_checkpointing,
                       a.overhead_gib)
    print(f"recommended: {advice}")
    return 0 if not advice.startswith("nothing") else 1
