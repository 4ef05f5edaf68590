"""Peak memory and time of the CLIP loss alone: local loss vs the naive global loss.

Both modes gather features with gradients on real gloo ranks (spawned processes, one thread
each).  "naive" is ``ClipLoss(local_loss=False)``: every rank scores the whole B x B logits
matrix.  "local" is ``ClipLoss(local_loss=True)``: each rank scores only its b = B/W rows,
b x B logits.  One step = forward + backward of the loss on random unit features.  For
reference, open_clip's own ``ClipLoss`` in both modes is measured at the smaller batches.

Memory is the rise of the rank's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set just before the step.  glibc's mmap threshold is
pinned to 64 KiB so freed tensors leave the resident set instead of lingering on the heap.
The reported value is the larger of the two ranks.

Usage:  python benchmarks/loss_memory.py [--max-global-batch 16384] [--smoke] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# glibc reads this at start-up, so it must be in the environment the ranks inherit.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsclip.loss import ClipLoss
from dsclip.progress import memory_kib
from tests.distributed import run_ranks

GIB = 2**30
FIT_BUDGET = 8 * GIB
MODES = ("naive", "local")
REF_MODES = ("open_clip naive", "open_clip local")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)


def _one_step(
    loss_fn: torch.nn.Module, batch: int, dim: int, world: int, rank: int
) -> tuple[int, float, float]:
    gen = torch.Generator().manual_seed(rank)
    img = F.normalize(torch.randn(batch // world, dim, generator=gen), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(batch // world, dim, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    gc.collect()
    dist.barrier()
    _reset_peak_rss()
    before = memory_kib("VmRSS")
    start, cpu_start = time.perf_counter(), time.process_time()
    loss_fn(img, txt, scale).backward()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = memory_kib("VmHWM") - before
    dist.barrier()
    return peak * 1024, elapsed, cpu


def _make_loss(mode: str, rank: int, world: int) -> torch.nn.Module:
    local = mode.endswith("local")
    if mode.startswith("open_clip"):
        from open_clip.loss import ClipLoss as OpenClipLoss

        return OpenClipLoss(local_loss=local, gather_with_grad=True, rank=rank, world_size=world)
    return ClipLoss(local_loss=local, gather_with_grad=True)


def _rank_main(rank: int, world: int, plan: list[tuple[str, int]], dim: int, repeats: int) -> list[dict]:
    warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's deprecated all_gather
    results = []
    for mode, batch in plan:
        loss_fn = _make_loss(mode, rank, world)
        # Big steps take tens of seconds and vary little relative to their length: run them once.
        steps = repeats if batch <= 4096 else 1
        _one_step(loss_fn, min(batch, 256 * world), dim, world, rank)  # warm-up (threads, gloo buffers)
        runs = [_one_step(loss_fn, batch, dim, world, rank) for _ in range(steps)]
        results.append(
            {
                "mode": mode,
                "global_batch": batch,
                "peak_bytes": max(r[0] for r in runs),
                "time_s": statistics.median(r[1] for r in runs),
                "cpu_s": statistics.median(r[2] for r in runs),
                "steps": steps,
            }
        )
    return results


def _logits_per_rank(mode: str, batch: int, world: int) -> int:
    return (batch // world) * batch if mode.endswith("local") else batch * batch


def _fit(rows: list[dict], world: int) -> tuple[float, float]:
    """Least squares ``peak = a * logits_per_rank + c * global_batch`` (logits + feature terms)."""
    xs = [(_logits_per_rank(r["mode"], r["global_batch"], world), r["global_batch"]) for r in rows]
    ys = [r["peak_bytes"] for r in rows]
    if len(rows) == 1:
        return ys[0] / xs[0][0], 0.0
    sxx = sum(x * x for x, _ in xs)
    sxb = sum(x * b for x, b in xs)
    sbb = sum(b * b for _, b in xs)
    sxy = sum(x * y for (x, _), y in zip(xs, ys))
    sby = sum(b * y for (_, b), y in zip(xs, ys))
    det = sxx * sbb - sxb * sxb
    a, c = (sxy * sbb - sby * sxb) / det, (sby * sxx - sxy * sxb) / det
    if c < 0:  # noise at small batches; a negative per-sample cost is unphysical
        return sxy / sxx, 0.0
    return a, c


def _max_batch(a: float, c: float, mode: str, world: int, budget: int = FIT_BUDGET) -> int:
    """Largest B with a * logits(B) + c * B <= budget (per rank)."""
    q = a / world if mode.endswith("local") else a  # a * logits(B) = q * B^2
    return int((-c + math.sqrt(c * c + 4 * q * budget)) / (2 * q))


def _hardware() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "?")
    mem = _status_kib_meminfo("MemTotal")
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "machine": platform.machine(),
        "mem_total_gib": round(mem / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def _status_kib_meminfo(field: str) -> int:
    with open("/proc/meminfo") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith(field + ":"))


def _plan(args: argparse.Namespace) -> tuple[list[tuple[str, int]], list[str]]:
    """Configs to run; ones predicted to exceed the RAM budget are skipped (and reported)."""
    budget = args.ram_budget_gib * GIB
    plan, skipped = [], []
    batch = args.min_global_batch
    while batch <= args.max_global_batch:
        modes = MODES + (REF_MODES if batch <= args.ref_max_global_batch else ())
        for mode in modes:
            # Live fp32 copies of the logits at the peak, with slack: measured ~1.3 for dsclip's
            # fused loss and ~4 for open_clip's (logits, log-softmax, their gradients).
            copies = 6 if mode in REF_MODES else 2
            need = args.world * copies * 4 * _logits_per_rank(mode, batch, args.world)
            if need > budget:
                skipped.append(
                    f"{mode} B={batch}: predicted {need / GIB:.1f} GiB > {args.ram_budget_gib} GiB"
                )
            else:
                plan.append((mode, batch))
        batch *= 2
    return plan, skipped


def _mib(row: dict | None) -> str:
    return f"{row['peak_bytes'] / 2**20:.1f}" if row else "-"


def _secs(row: dict | None, key: str = "time_s") -> str:
    return f"{row[key]:.3f}" if row else "-"


def _wall_cpu(row: dict | None) -> str:
    return f"{row['time_s']:.2f} / {row['cpu_s']:.2f}" if row else "-"


def _ratio(entry: dict, key: str) -> str:
    return f"{entry[key]:.2f}" if key in entry else "-"


def _markdown(report: dict) -> str:
    hw, cfg = report["hardware"], report["config"]
    lines = [
        "# CLIP loss memory: local vs naive global loss",
        "",
        (
            f"{cfg['world']} gloo ranks (1 thread each) on {hw['cpu_count']} CPUs ({hw['cpu_model']}, "
            f"{hw['mem_total_gib']} GiB), torch {hw['torch']}, python {hw['python']}, {hw['date_utc']} UTC. "
            f"Features {cfg['dim']}-d fp32; one step = forward + backward of the loss alone, median of "
            f"{cfg['repeats']} steps up to B=4096, a single step above. The machine was shared with other "
            "jobs, so wall times are noisy; process CPU time is the steadier comparison."
        ),
        "",
        f"Memory per rank: {report['method']}.",
        "",
        (
            "| global batch | naive MiB | local MiB | naive/local mem | naive s wall / CPU "
            "| local s wall / CPU | naive/local CPU time | open_clip naive MiB | open_clip local MiB |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["comparison"]:
        rows = {r["mode"]: r for r in report["rows"] if r["global_batch"] == c["global_batch"]}
        lines.append(
            f"| {c['global_batch']} | {_mib(rows.get('naive'))} | {_mib(rows.get('local'))} | "
            f"{_ratio(c, 'mem_ratio')} | {_wall_cpu(rows.get('naive'))} | {_wall_cpu(rows.get('local'))} | "
            f"{_ratio(c, 'cpu_ratio')} | {_mib(rows.get(REF_MODES[0]))} | {_mib(rows.get(REF_MODES[1]))} |"
        )
    fit = report["fit"]
    lines += [
        "",
        "Least-squares fit of the measured peaks, per rank: "
        + "; ".join(
            f"{m}: {f['bytes_per_logit']:.2f} B/logit + {f['bytes_per_sample']:.0f} B/sample"
            for m, f in fit.items()
        )
        + ". Logits per rank: naive B^2, local B^2/W.",
        "",
    ]
    lines += [
        (
            "| world size | naive logits/rank at B=32k | local logits/rank at B=32k "
            "| largest B in 8 GiB, naive | largest B in 8 GiB, local |"
        ),
        "|---:|---:|---:|---:|---:|",
    ]
    for e in report["extrapolation"]:
        lines.append(
            f"| {e['world']} | {e['naive_logits_32k']:,} | {e['local_logits_32k']:,} | "
            f"{e.get('max_batch_8gib_naive', '-'):,} | {e.get('max_batch_8gib_local', '-'):,} |"
        )
    if report["skipped"]:
        lines += ["", "Not run (predicted to exceed the RAM budget): " + "; ".join(report["skipped"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-global-batch", type=int, default=1024)
    p.add_argument("--max-global-batch", type=int, default=32768)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-max-global-batch", type=int, default=4096, help="largest batch for open_clip rows")
    p.add_argument(
        "--ram-budget-gib", type=float, default=round(0.6 * _status_kib_meminfo("MemAvailable") / 2**20, 1)
    )
    p.add_argument("--smoke", action="store_true", help="tiny batches, one repeat (< 30 s)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.smoke:
        args.min_global_batch, args.max_global_batch, args.repeats = 256, 512, 1
        args.ref_max_global_batch = 0  # importing open_clip in the ranks costs seconds

    plan, skipped = _plan(args)
    for line in skipped:
        print("skip:", line)
    t0 = time.perf_counter()
    per_rank = run_ranks(_rank_main, args.world, plan, args.dim, args.repeats, timeout=1800)
    rows = [
        {
            "mode": r0["mode"],
            "global_batch": r0["global_batch"],
            "world": args.world,
            "logits_per_rank": _logits_per_rank(r0["mode"], r0["global_batch"], args.world),
            "peak_bytes": max(r[i]["peak_bytes"] for r in per_rank),
            "time_s": max(r[i]["time_s"] for r in per_rank),
            "cpu_s": max(r[i]["cpu_s"] for r in per_rank),
            "steps": r0["steps"],
        }
        for i, r0 in enumerate(per_rank[0])
    ]

    comparison = []
    for batch in sorted({r["global_batch"] for r in rows}):
        by_mode = {r["mode"]: r for r in rows if r["global_batch"] == batch}
        entry: dict = {"global_batch": batch}
        if "naive" in by_mode and "local" in by_mode:
            naive, local = by_mode["naive"], by_mode["local"]
            entry["mem_ratio"] = naive["peak_bytes"] / local["peak_bytes"]
            entry["time_ratio"] = naive["time_s"] / local["time_s"]
            entry["cpu_ratio"] = naive["cpu_s"] / local["cpu_s"]
            print(
                f"B={batch:>6}: naive/local memory ratio {entry['mem_ratio']:.2f}x "
                f"(expect ~{args.world} = world size), time ratio {entry['time_ratio']:.2f}x wall, "
                f"{entry['cpu_ratio']:.2f}x CPU  "
                f"[naive {_mib(naive)} MiB {_secs(naive)} s, local {_mib(local)} MiB {_secs(local)} s wall]"
            )
        for mode in REF_MODES:
            if mode in by_mode:
                ref = by_mode[mode]
                print(
                    f"B={batch:>6}: {mode}: {_mib(ref)} MiB {_secs(ref)} s wall {_secs(ref, 'cpu_s')} s CPU"
                )
        comparison.append(entry)

    fit = {}
    for mode in MODES:
        # Fit on the larger half of the batches, where the logits dominate the fixed costs.
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["global_batch"])
        if mine:
            a, c = _fit(mine[len(mine) // 2 :], args.world)
            fit[mode] = {"bytes_per_logit": a, "bytes_per_sample": c}
    extrapolation = []
    for world in sorted({args.world, 8, 32, 128}):
        entry = {
            "world": world,
            "naive_logits_32k": _logits_per_rank("naive", 32768, world),
            "local_logits_32k": _logits_per_rank("local", 32768, world),
        }
        for mode, f in fit.items():
            entry[f"max_batch_8gib_{mode}"] = _max_batch(
                f["bytes_per_logit"], f["bytes_per_sample"], mode, world
            )
        extrapolation.append(entry)
        print(
            f"world {world:>3}: largest global batch in 8 GiB/rank (fitted): "
            + ", ".join(f"{m} {entry[f'max_batch_8gib_{m}']:,}" for m in fit)
            + f"  (logits/rank at B=32k: naive {entry['naive_logits_32k']:,}, "
            f"local {entry['local_logits_32k']:,})"
        )

    report = {
        "hardware": _hardware(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "method": "rise of the peak resident set (VmHWM, reset via /proc/self/clear_refs) over the resident "
        "set just before the step, glibc MALLOC_MMAP_THRESHOLD_=64KiB, larger of the ranks; "
        "time is the median wall (and process CPU) time of the step, slower of the ranks",
        "rows": rows,
        "comparison": comparison,
        "fit": fit,
        "extrapolation": extrapolation,
        "skipped": skipped,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "loss_memory.md").write_text(_markdown(report))
    print(f"wrote {args.out / 'loss_memory.json'} and .md ({report['wall_s']} s)")
    return report


if __name__ == "__main__":
    main()
