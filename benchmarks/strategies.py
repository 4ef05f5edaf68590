"""Per-rank peak memory and step time of each fine-tuning strategy, relative to ``full``.

Two real gloo ranks (spawned processes, one thread each) run the trainer's own path: an open_clip
ViT-B-32 with random weights, dsclip's ``apply_strategy`` and ``param_groups_for``, and a ZeRO-2
DeepSpeed engine built by ``dsclip.engine`` from ``ds_configs/zero2.json``.  A step is forward,
local InfoNCE loss, backward and optimizer step on synthetic images and tokens.  ``lit`` uses an
open_clip config with a timm ViT-B/32 image tower (``vit_base_patch32_224``) and the same text
tower, as a LiT run would.

Freezing saves the frozen parameters' gradients, their fp32 master copies and both Adam moments,
and the backward pass through a frozen tower's weights (its activations' gradients are still
needed below any trainable layer, which a fully frozen image tower does not have).

Memory: the rank's peak resident set (VmHWM) while building the model and engine and training,
both absolute and as the rise over the resident set before the model was built.  glibc's mmap
threshold is pinned to 64 KiB so freed tensors leave the resident set.  Each strategy runs in
fresh processes (``--smoke`` runs them all in one pair of processes to stay quick).  Step time is
the median over the measured steps after one warm-up step, slowest rank.

Usage:  python benchmarks/strategies.py [--steps 3] [--batch 4] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# glibc and DeepSpeed read these at start-up, so they must be in the environment the ranks inherit.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch

from dsclip.progress import memory_kib
from tests.distributed import run_ranks

MIB = 2**20
STRATEGIES = ("full", "partial", "lock-image", "lock-text", "lit")
TINY_JSON = ROOT / "tests" / "assets" / "tiny-clip.json"


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _model_name(strategy: str, smoke: bool) -> str:
    """Register (if needed) and return the open_clip model name for a strategy."""
    import open_clip

    if smoke:
        open_clip.add_model_config(str(TINY_JSON))
        base = "tiny-clip"
    else:
        base = "ViT-B-32"
    if strategy != "lit":
        return base
    cfg = json.loads(json.dumps(open_clip.get_model_config(base)))
    cfg["vision_cfg"] = {"image_size": cfg["vision_cfg"]["image_size"], "timm_proj": "linear",
                         "timm_model_name": "test_vit" if smoke else "vit_base_patch32_224",
                         "timm_model_pretrained": False, "timm_pool": ""}
    cfg.pop("quick_gelu", None)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"dsclip-bench-lit-{base}-{os.getpid()}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    return path.stem


def _measure(strategy: str, rank: int, world: int, smoke: bool, batch: int, steps: int) -> dict:
    import open_clip
    import torch.distributed as dist

    from dsclip.config import Config
    from dsclip.engine import fill_ds_config, initialize_engine, load_ds_config
    from dsclip.loss import ClipLoss
    from dsclip.model import promote_scalar_params
    from dsclip.strategies import apply_strategy, apply_strategy_defaults, param_groups_for

    cfg = Config()
    cfg.strategy.strategy = strategy
    cfg.model.pretrained_image = "random-init (benchmark)" if strategy == "lit" else ""
    cfg.optim.batch_size = batch
    cfg.optim.lr = 1e-4
    apply_strategy_defaults(cfg)

    gc.collect()
    dist.barrier()
    base_rss = memory_kib("VmRSS")
    _reset_peak_rss()
    torch.manual_seed(rank)
    model = open_clip.create_model(_model_name(strategy, smoke))
    promote_scalar_params(model)
    frozen = apply_strategy(model, cfg)
    groups = param_groups_for(model, cfg)
    trainable = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in model.parameters())
    ds = fill_ds_config(load_ds_config(str(ROOT / "ds_configs" / "zero2.json")), cfg, world, "fp32")
    engine = initialize_engine(model, groups, ds, on_gpu=False)
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    ctx = model.context_length if hasattr(model, "context_length") else 77
    gen = torch.Generator().manual_seed(100 + rank)
    images = torch.randn(batch, 3, *size, generator=gen)
    texts = torch.randint(1, 1000, (batch, ctx), generator=gen)

    times, cpu_times = [], []
    for i in range(steps + 1):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        image_f, text_f, scale = engine(images, texts)[:3]
        loss = loss_fn(image_f, text_f, scale)
        engine.backward(loss)
        engine.step()
        if i > 0:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = memory_kib("VmHWM")
    row = {"strategy": strategy, "rank": rank, "trainable_params": trainable, "total_params": total,
           "frozen_tensors": len(frozen), "groups": len(groups), "peak_rss_bytes": peak * 1024,
           "peak_rise_bytes": (peak - base_rss) * 1024, "step_s": statistics.median(times),
           "cpu_s": statistics.median(cpu_times),
           "loss": float(loss.detach())}
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, model, groups, loss_fn
    gc.collect()
    return row


def _rank_main(rank: int, world: int, strategies: list[str], smoke: bool, batch: int, steps: int) -> list[dict]:
    torch.set_num_threads(1)
    # DeepSpeed reuses the process group run_ranks built, but checks the launcher's variables
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    return [_measure(s, rank, world, smoke, batch, steps) for s in strategies]


def _merge(per_rank: list[list[dict]]) -> list[dict]:
    """One row per strategy: the larger peak and the slower step of the two ranks."""
    rows = []
    for same in zip(*per_rank):
        row = dict(same[0])
        row.pop("rank")
        for key in ("peak_rss_bytes", "peak_rise_bytes", "step_s", "cpu_s"):
            row[key] = max(r[key] for r in same)
        rows.append(row)
    full = next((r for r in rows if r["strategy"] == "full"), None)
    for row in rows:
        for key, out in (("peak_rss_bytes", "mem_ratio"), ("peak_rise_bytes", "rise_ratio"), ("step_s", "time_ratio"),
                         ("cpu_s", "cpu_ratio")):
            row[out] = row[key] / full[key] if full and full[key] else None
    return rows


def _hardware() -> dict:
    import deepspeed
    import open_clip
    import timm

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")), "0")
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu, "mem_total_bytes": int(mem) * 1024,
            "machine": platform.machine(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "open_clip": open_clip.__version__,
            "timm": timm.__version__, "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}


def _ratio(x: float | None) -> str:
    return f"{x:.2f}" if x is not None else "-"


def _markdown(report: dict) -> str:
    hw, cfg = report["hardware"], report["config"]
    versions = (f"{report['date']}; {hw['cpu_model']} ({hw['cpu_count']} cores), Python {hw['python']}, "
                f"torch {hw['torch']}, DeepSpeed {hw['deepspeed']}, open_clip {hw['open_clip']}, timm {hw['timm']}.")
    one_pair = " (all strategies in one process pair)" if cfg["smoke"] else ""
    setup = (f"Model {cfg['model']} (random init; lit: timm {cfg['lit_trunk']} image tower), {cfg['world']} gloo "
             f"ranks x 1 thread, ZeRO-{cfg['zero_stage']}, fp32, batch {cfg['batch_per_rank']} per rank, local "
             f"InfoNCE, AdamW; step time is the median of {cfg['steps']} steps after a warm-up step (slowest rank); "
             f"memory is the larger rank's peak RSS{one_pair}.  CPU s/step is the rank's own CPU time, which other "
             f"load on the machine disturbs less than wall time (1-minute load average at the end: "
             f"{hw['load_avg_1m_at_end']} on {hw['cpu_count']} cores).")
    header = ("| strategy | trainable params | peak RSS / rank | rise over start | s/step | CPU s/step "
              "| memory vs full | rise vs full | time vs full | CPU time vs full |")
    lines = ["# Fine-tuning strategies: per-rank memory and step time", "", versions, "", setup, "", header,
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['strategy']} | {r['trainable_params'] / 1e6:.1f}M of {r['total_params'] / 1e6:.1f}M | "
                     f"{r['peak_rss_bytes'] / MIB:,.0f} MiB | {r['peak_rise_bytes'] / MIB:,.0f} MiB | "
                     f"{r['step_s']:.2f} | {r['cpu_s']:.2f} | {_ratio(r['mem_ratio'])} | {_ratio(r['rise_ratio'])} | "
                     f"{_ratio(r['time_ratio'])} | {_ratio(r['cpu_ratio'])} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="measured steps per strategy (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=4, help="batch per rank")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 measured step, one process pair (< 60 s)")
    ap.add_argument("--out", default=None, help="write strategies.json and strategies.md here")
    args = ap.parse_args(argv)
    strategies = list(args.strategies)
    if "full" in strategies:  # ratios need it first
        strategies.remove("full")
        strategies.insert(0, "full")
    steps = 1 if args.smoke else args.steps
    t0 = time.perf_counter()
    if args.smoke:
        per_rank = run_ranks(_rank_main, args.world, strategies, True, args.batch, steps, timeout=300)
    else:
        per_strategy = [run_ranks(_rank_main, args.world, [s], False, args.batch, steps, timeout=900)
                        for s in strategies]
        per_rank = [[res[r][0] for res in per_strategy] for r in range(args.world)]
    rows = _merge(per_rank)
    report = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "hardware": _hardware(),
              "config": {"model": "tiny-clip" if args.smoke else "ViT-B-32",
                         "lit_trunk": "test_vit" if args.smoke else "vit_base_patch32_224", "world": args.world,
                         "zero_stage": 2, "batch_per_rank": args.batch, "steps": steps, "smoke": args.smoke,
                         "wall_s": round(time.perf_counter() - t0, 1)},
              "rows": rows}
    md = _markdown(report)
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "strategies.json").write_text(json.dumps(report, indent=1))
        (out / "strategies.md").write_text(md)
        print(f"wrote {out / 'strategies.json'} and {out / 'strategies.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
