"""Peak per-rank host memory of dsclip training across ZeRO stages, against DeepSpeed's estimators.

Each configuration is a real 2-rank dsclip run (torchrun, gloo, 1 thread per rank, fp32,
synthetic data) of a few steps.  Every rank reads ``VmHWM`` (peak RSS) from
``/proc/self/status`` at the end of training, and ``VmRSS`` just before the model is built (the
process baseline: interpreter, torch, DeepSpeed, tokenizer).

* Per-sample activation memory: the slope of peak RSS between two per-rank batch sizes, measured
  on ZeRO-0 (activations do not depend on the ZeRO stage; ``--slope-all`` measures it per stage).
* Model-state memory per rank: peak RSS at the first batch size, minus slope x batch, minus the
  baseline.  Target: ZeRO-3 / ZeRO-0 <= 0.6.
* Largest per-rank batch in ``--budget-gb``: (budget - peak at batch 0) / slope.
* DeepSpeed's estimators (``estimate_zero2/3_model_states_mem_needs``; the ``_all_live`` tables are
  in the JSON) assume 16-bit training on GPUs: on CPU ranks both their "GPU" and "CPU" figures are
  host memory, so the per-rank estimate is gpu + cpu / ranks.  Under ZeRO-3 dsclip builds the
  model inside ``zero.Init``, so the ZeRO-3 estimate uses ``zero_init=True``.
* glibc's ``MALLOC_MMAP_THRESHOLD_`` is 64 KiB for every run, so freed buffers leave the resident
  set and the peak is what was live (the same setting for every stage).

Usage:  python benchmarks/memory.py [--smoke] [--model M] [--batches 2,4] [--stages 0,1,2,3,3o]
                                   [--budget-gb 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DEFAULT_OUT, TINY_MODEL, launch_dsclip, md_table, write_report

TARGET = 0.6
GIB = 1024 ** 3


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batches", default="2,32",
                   help="two per-rank batch sizes; at the second the activations, not the optimizer step, set the peak")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--stages", default="0,1,2,3,3o", help="ZeRO stages; 3o = ZeRO-3 with CPU offload")
    p.add_argument("--slope-all", action="store_true", help="measure both batch sizes on every stage")
    p.add_argument("--budget-gb", type=float, default=8.0, help="per-rank memory budget, GiB")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.batches, a.steps, a.stages = TINY_MODEL, "4,32", 2, "0,3"
    return a


def ds_config(stage: str) -> str:
    return "zero3_offload" if stage == "3o" else f"zero{stage}"


def measure(model: str, stage: str, batch: int, steps: int) -> dict:
    res = launch_dsclip(model, batch, steps, ds_config(stage), nproc=2, threads=1, warmup=0,
                        env={"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
    ranks = res["ranks"]
    return {"stage": stage, "batch": batch, "peak_bytes": max(r["hwm_kb"] for r in ranks) * 1024,
            "baseline_bytes": max(r["rss_before_model_kb"] for r in ranks) * 1024,
            "peak_after_setup_bytes": max(r["hwm_after_setup_kb"] for r in ranks) * 1024,
            "params": ranks[0]["params"], "samples_per_s": res["samples_per_s"]}


def estimates(model_name: str, ranks: int) -> tuple[dict, dict]:
    import open_clip
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_live,
    )
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_live,
    )

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dsclip.model import register_model

    model = open_clip.create_model(register_model(model_name))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    tables = io.StringIO()
    with contextlib.redirect_stdout(tables):
        estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=ranks)
        estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=ranks)

    def per_rank(cpu: int, gpu: int) -> int:
        return int(gpu + cpu / ranks)

    z0 = per_rank(*estimate_zero2_model_states_mem_needs(total, 1, 1, cpu_offload=False))  # nothing partitioned
    z2 = per_rank(*estimate_zero2_model_states_mem_needs(total, ranks, 1, cpu_offload=False))
    z3 = per_rank(*estimate_zero3_model_states_mem_needs(total, largest, ranks, 1, cpu_offload=False,
                                                         cpu_offload_params=False, zero_init=True)[:2])
    z3o = per_rank(*estimate_zero3_model_states_mem_needs(total, largest, ranks, 1, cpu_offload=True,
                                                          cpu_offload_params=True, zero_init=True)[:2])
    est = {"0": z0, "1": z2, "2": z2, "3": z3, "3o": z3o}
    return est, {"total_params": total, "largest_layer_params": largest, "all_live_tables": tables.getvalue()}


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    b1, b2 = (int(x) for x in a.batches.split(","))
    stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    runs = []
    for stage in stages:
        for b in ([b1, b2] if a.slope_all or stage == stages[0] else [b1]):
            r = measure(a.model, stage, b, a.steps)
            runs.append(r)
            print(f"ZeRO-{stage} batch {b}/rank: peak RSS {r['peak_bytes'] / GIB:.2f} GiB/rank "
                  f"(baseline {r['baseline_bytes'] / GIB:.2f}, after setup {r['peak_after_setup_bytes'] / GIB:.2f})",
                  flush=True)
    est, info = estimates(a.model, 2)

    def slope_for(stage: str) -> float:
        pts = {r["batch"]: r["peak_bytes"] for r in runs if r["stage"] == stage}
        if b2 not in pts:
            stage = stages[0]
            pts = {r["batch"]: r["peak_bytes"] for r in runs if r["stage"] == stage}
        return max(0.0, (pts[b2] - pts[b1]) / (b2 - b1))

    rows = []
    for stage in stages:
        r = next(x for x in runs if x["stage"] == stage and x["batch"] == b1)
        slope = slope_for(stage)
        at_zero = r["peak_bytes"] - slope * b1
        states = at_zero - r["baseline_bytes"]
        fit = int((a.budget_gb * GIB - at_zero) // slope) if slope > 0 else None
        rows.append({"stage": f"ZeRO-{stage}" if stage != "3o" else "ZeRO-3 offload",
                     "peak_gib": r["peak_bytes"] / GIB, "baseline_gib": r["baseline_bytes"] / GIB,
                     "model_states_gib": states / GIB, "ds_estimate_gib": est[stage] / GIB,
                     "act_mib_per_sample": slope / 2 ** 20, "max_batch_in_budget": fit,
                     "samples_per_s": r["samples_per_s"], "_states": states, "_key": stage})
    by = {r["_key"]: r for r in rows}
    ratio = by["3"]["_states"] / by["0"]["_states"] if "3" in by and "0" in by else float("nan")
    peak_ratio = by["3"]["peak_gib"] / by["0"]["peak_gib"] if "3" in by and "0" in by else float("nan")
    print(md_table(rows, ["stage", "peak_gib", "model_states_gib", "ds_estimate_gib", "act_mib_per_sample",
                          "max_batch_in_budget"]))
    print(f"ZeRO-3/ZeRO-0 model-state ratio: {ratio:.3f} (target <= {TARGET}); peak RSS ratio {peak_ratio:.3f}")
    for r in rows:
        print(f"largest per-rank batch in {a.budget_gb:g} GiB/rank, {r['stage']}: {r['max_batch_in_budget']}")
    for r in rows:
        r.pop("_states")
        r.pop("_key")
    config = {"model": a.model, "ranks": 2, "threads_per_rank": 1, "batches_per_rank": [b1, b2], "steps": a.steps,
              "stages": stages, "budget_gib": a.budget_gb, "precision": "fp32", "slope_all": a.slope_all,
              "smoke": a.smoke}
    results = {"zero3_over_zero0_model_states": ratio, "zero3_over_zero0_peak": peak_ratio, "target": TARGET,
               "rows": rows, "runs": runs, "estimator": info}
    sections = [(f"ZeRO-3 / ZeRO-0 model-state memory per rank: **{ratio:.3f}** (target <= {TARGET}); "
                f"peak RSS ratio {peak_ratio:.3f}."),
                md_table(rows, ["stage", "peak_gib", "baseline_gib", "model_states_gib", "ds_estimate_gib",
                                "act_mib_per_sample", "max_batch_in_budget", "samples_per_s"]),
                (f"Peak = VmHWM per rank (max over ranks) at {b1}/rank; model states = peak - slope x batch - "
                f"baseline (RSS before the model is built); the slope is per-sample activation memory from "
                f"{b1} and {b2}/rank. DeepSpeed's estimates assume 16-bit GPU training (per rank = gpu + cpu/ranks).")]
    write_report(a.out, "memory", "Peak memory per rank across ZeRO stages", config, results, sections)
    return results


if __name__ == "__main__":
    main()
