"""Training throughput: dsclip against open_clip_train, and dsclip across ZeRO stages.

1. One process each, same model, batch, fp32, synthetic data and thread count: open_clip_train
   (``--local-loss --gather-with-grad``) and dsclip at ZeRO-2 (``ds_configs/zero2.json``), run
   alternately ``--repeats`` times.  Each run's figure is the median samples/s over its steps
   after the first (start-up and the warm-up step excluded); the reported figure is the median
   over repeats.  Target: dsclip / open_clip_train >= 0.95.
2. dsclip on 2 ranks (gloo, ``--threads`` split between them, the same global batch) at ZeRO-0..3.

open_clip_train's DDP wrapper passes ``device_ids=[cpu]`` and fails with more than one rank on
CPU, so the peer is compared on one process only.

Every dsclip step is split into data wait, forward (+ the CLIP loss's feature gather), backward,
optimizer step, and the time inside blocking ``deepspeed.comm`` collectives (part of backward and
step, shown separately), timed inside the real training loop (see ``common.py``).

Usage:  python benchmarks/throughput.py [--smoke] [--model M] [--batch-size B] [--steps N]
                                       [--repeats R] [--threads T] [--stages 0,1,2,3] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DEFAULT_OUT,
    PHASES,
    TINY_MODEL,
    format_breakdown,
    launch_dsclip,
    launch_open_clip,
    md_table,
    median,
    write_report,
)

TARGET = 0.95


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (per process; split over 2 ranks)")
    p.add_argument("--steps", type=int, default=4, help="steps per run; the first is warm-up")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--stages", default="0,1,2,3", help="ZeRO stages for the 2-rank runs ('' for none)")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, ZeRO-2 only: seconds")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.batch_size, a.steps, a.repeats, a.stages = TINY_MODEL, 8, 4, 1, "2"
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    runs: dict[str, list[dict]] = {"open_clip_train": [], "dsclip_zero2": []}
    for r in range(a.repeats):
        order = ["open_clip_train", "dsclip_zero2"]
        for which in order if r % 2 == 0 else order[::-1]:  # alternate, so drift in load hits both
            if which == "open_clip_train":
                res = launch_open_clip(a.model, a.batch_size, a.steps, a.threads)
            else:
                res = launch_dsclip(a.model, a.batch_size, a.steps, "zero2", nproc=1, threads=a.threads)
            runs[which].append(res)
            print(f"repeat {r + 1}/{a.repeats} {which}: {res['samples_per_s']:.2f} samples/s", flush=True)
    oc = median([x["samples_per_s"] for x in runs["open_clip_train"]])
    ds = median([x["samples_per_s"] for x in runs["dsclip_zero2"]])
    per_repeat = [d["samples_per_s"] / o["samples_per_s"] for o, d in zip(runs["open_clip_train"],
                                                                           runs["dsclip_zero2"])]
    ratio = ds / oc
    rows = [{"run": "open_clip_train, 1 process", "samples_per_s": oc,
             "data_wait_frac": median([x["data_wait_frac"] for x in runs["open_clip_train"]])},
            {"run": "dsclip ZeRO-2, 1 rank", "samples_per_s": ds,
             "data_wait_frac": median([x["data_wait_frac"] for x in runs["dsclip_zero2"]]),
             **_phase_cols(runs["dsclip_zero2"][-1]["breakdown"])}]
    print(f"open_clip_train: {oc:.2f} samples/s; dsclip ZeRO-2: {ds:.2f} samples/s")
    print(f"dsclip/open_clip ratio: {ratio:.3f} (target >= {TARGET}; per repeat "
          f"{', '.join(f'{x:.3f}' for x in per_repeat)})")
    print(f"dsclip 1-rank step breakdown: {format_breakdown(runs['dsclip_zero2'][-1]['breakdown'])}")

    multi = []
    per_rank = max(1, a.batch_size // 2)
    for stage in [int(s) for s in a.stages.split(",") if s.strip()]:
        res = launch_dsclip(a.model, per_rank, a.steps, f"zero{stage}", nproc=2, threads=max(1, a.threads // 2))
        res["stage"] = stage
        multi.append(res)
        rows.append({"run": f"dsclip ZeRO-{stage}, 2 ranks", "samples_per_s": res["samples_per_s"],
                     "data_wait_frac": res["data_wait_frac"], **_phase_cols(res["breakdown"])})
        print(f"dsclip ZeRO-{stage} 2 ranks: {res['samples_per_s']:.2f} samples/s "
              f"({res['samples_per_s'] / oc:.3f}x open_clip_train 1 process); {format_breakdown(res['breakdown'])}",
              flush=True)

    config = {"model": a.model, "global_batch": a.batch_size, "batch_per_rank_2ranks": per_rank,
              "steps_per_run": a.steps, "warmup_steps": 1, "repeats": a.repeats, "threads": a.threads,
              "precision": "fp32", "data": "synthetic", "smoke": a.smoke}
    results = {"ratio_dsclip_over_open_clip": ratio, "ratio_per_repeat": per_repeat, "target": TARGET,
               "open_clip_samples_per_s": oc, "dsclip_zero2_samples_per_s": ds,
               "runs": {k: [_slim(x) for x in v] for k, v in runs.items()},
               "two_ranks": [_slim(x) for x in multi], "rows": rows}
    cols = ["run", "samples_per_s", "data_wait_frac", *[f"{p}_s" for p in PHASES], "total_s"]
    sections = [(f"dsclip ZeRO-2 / open_clip_train (1 process each, median of {a.repeats} alternating repeats): "
                f"**{ratio:.3f}** (target >= {TARGET})."),
                md_table(rows, cols),
                ("Phases are seconds per step (median over measured steps, mean over ranks); `comm_s` is the time "
                "inside blocking deepspeed.comm collectives and is already part of backward/step. "
                "open_clip_train rows have no phase split (its log gives data and batch time only).")]
    write_report(a.out, "throughput", "Training throughput: dsclip vs open_clip_train", config, results, sections)
    return results


def _phase_cols(b: dict) -> dict:
    return {**{f"{p}_s": b[p] for p in PHASES}, "total_s": b["total"]}


def _slim(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "ranks"} | (
        {"rss_hwm_kb": [r["hwm_kb"] for r in res["ranks"]]} if "ranks" in res else {})


if __name__ == "__main__":
    main()
