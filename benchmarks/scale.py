"""Scale proof: a model whose fp32 training state does not fit this machine under ZeRO-0 on 2 ranks
trains under ZeRO-3 (built partitioned with deepspeed.zero.Init), and ZeRO-0 is refused up front
by the memory plan instead of being OOM-killed.  Also the ViT-B-32 ZeRO-3 / ZeRO-0 per-rank
memory ratio.

    python benchmarks/scale.py                      # ViT-H-14 at 112 px + the ViT-B-32 ratio
    python benchmarks/scale.py --smoke --out /tmp/x # tiny model, seconds

Memory per rank is the trainer's own report: peak RSS (VmHWM) and the part of it added over
the process's RSS right after start-up (the training state, without the framework's libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import run_job

from tests.launch import TINY, free_port


def launch(model: str, stage: int, logs: str, name: str, steps: int, size: int | None, batch: int,
           timeout: float, budget_gib: float | None = None) -> tuple[int, str, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(ROOT, "dsclip", "train.py"),
           "--ds_config", os.path.join(ROOT, "ds_configs", f"zero{stage}.json"), "--model", model,
           "--dataset-type", "synthetic", "--train-num-samples", str(batch * 2 * steps), "--batch-size", str(batch),
           "--epochs", "1", "--lr", "1e-5", "--warmup", "1", "--precision", "fp32", "--logs-dir", logs,
           "--name", name, "--log-every-n-steps", "1", "--workers", "0", "--val-frequency", "0",
           "--zeroshot-frequency", "0", "--no-baseline-eval", "--save-frequency", "0", "--threads", "1",
           "--grad-checkpointing"]
    if size:
        cmd += ["--force-image-size", str(size)]
    if budget_gib:
        cmd += ["--memory-budget-gib", f"{budget_gib:.4f}"]
    # the same allocator setting for every stage: freed buffers go back to the OS, so the peak RSS
    # is what was live, not what glibc's heap kept
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MALLOC_MMAP_THRESHOLD_=str(64 * 1024))
    t0 = time.monotonic()
    proc = run_job(cmd, timeout, cwd=ROOT, env=env)
    return proc.returncode, proc.stdout, time.monotonic() - t0


def memory(stdout: str) -> dict[int, tuple[float, float]]:
    """{rank: (peak GiB, added GiB)} from the trainer's summary line."""
    found = re.findall(r"rank (\d+) ([\d.]+) GiB \(\+([\d.]+) over start\)", stdout)
    return {int(r): (float(p), float(a)) for r, p, a in found}


def report_md(r: dict) -> str:
    z0, z3 = r["big_zero0"], r["big_zero3"]
    budget = (f"{r['budget_gib_per_rank']:.3f} GiB (given)" if r["budget_gib_per_rank"]
              else "the machine's free memory")
    peaks = ", ".join(f"{v:.2f}" for v in z3["peak_rss_gib"].values())
    states = ", ".join(f"{v:.2f}" for v in z3["train_state_gib"].values())
    lines = [(f"# Scale: ZeRO-3 past one rank's memory ({r['date']}, {r['cpus']} CPUs, {r['mem_total_gib']} GiB, "
              "fp32, 2 gloo ranks, 1 thread each)"), "",
             f"Big model: {r['big_model']}, batch 1/rank, --grad-checkpointing; per-rank budget {budget}.", "",
             "| run | exit | seconds | result |", "|---|---|---|---|",
             (f"| ZeRO-0 | {z0['exit']} | {z0['seconds']} | refused up front: {z0['refused_up_front']}; "
              f"`{z0['message']}` |"),
             (f"| ZeRO-3 | {z3['exit']} | {z3['seconds']} | 2 steps; peak RSS per rank {peaks} GiB; "
              f"training state {states} GiB (plan: {z3['plan_estimate_gib']:.2f}) |"), ""]
    if "ratio" in r:
        q = r["ratio"]
        lines += [f"{q['model']}, batch 4/rank, --grad-checkpointing, per rank (larger of the ranks):", "",
                  "| stage | peak RSS GiB | training state GiB | plan estimate GiB |", "|---|---|---|---|"]
        lines += [f"| ZeRO-{s} | {q['peak_rss_gib'][s]:.3f} | {q['train_state_gib'][s]:.3f} | "
                  f"{q['plan_estimate_gib'][s]:.3f} |" for s in (0, 3)]
        lines += ["", (f"ZeRO-3 / ZeRO-0 training state: **{q['zero3_over_zero0_train_state']:.3f}** "
                       f"(target <= 0.55); whole-process peak RSS {q['zero3_over_zero0_peak_rss']:.3f}."), ""]
    lines += [("Training state = peak RSS (VmHWM) less the rank's RSS right after start-up (interpreter, torch, "
               "DeepSpeed), as the trainer reports it. glibc MALLOC_MMAP_THRESHOLD_=64KiB for every run, so freed "
               "buffers leave the resident set. The plan estimate is `dsclip plan`'s total for the same run, "
               "which the trainer's up-front check compares with the free memory."), ""]
    return "\n".join(lines)


def plan_gib(model: str, stage: int, batch: int, size: int | None) -> float:
    """`dsclip plan`'s per-rank estimate for one of the runs below (fp32, 2 ranks, grad ckpt)."""
    from dsclip.config import parse_args
    from dsclip.plan import GIB, estimate, model_shape

    flags = ["--model", model, "--batch-size", str(batch), "--grad-checkpointing"]
    shape = model_shape(parse_args(flags + (["--force-image-size", str(size)] if size else [])), "fp32")
    return estimate(shape, stage, "fp32", batch, 2, True).total / GIB


def smoke_budget(model: str) -> float:
    """A per-rank budget between the plan's ZeRO-3 and ZeRO-0 estimates for ``model`` (batch 1,
    2 ranks): the tiny model then shows the same refusal a big one gets from the machine's memory."""
    from dsclip.config import parse_args
    from dsclip.plan import GIB, estimate, model_shape

    shape = model_shape(parse_args(["--model", model, "--batch-size", "1", "--grad-checkpointing"]), "fp32")
    z0, z3 = (estimate(shape, st, "fp32", 1, 2, True).total / GIB for st in (0, 3))
    if not z3 < z0:
        raise SystemExit(f"scale.py: the plan puts ZeRO-3 ({z3:.3f} GiB) at or above ZeRO-0 ({z0:.3f} GiB)")
    return (z0 + z3) / 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--big-model", default="ViT-H-14")
    p.add_argument("--big-size", type=int, default=112, help="image size for the big model (fewer tokens)")
    p.add_argument("--ratio-model", default="ViT-B-32")
    p.add_argument("--smoke", action="store_true", help="tiny model only")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--logs", default="/tmp/dsclip-scale")
    p.add_argument("--budget-gib", type=float, default=None,
                   help="per-rank memory budget for the big model (default: what the machine has free)")
    a = p.parse_args(argv)
    big, ratio_model = (TINY, TINY) if a.smoke else (a.big_model, a.ratio_model)
    budget = smoke_budget(big) if a.smoke and a.budget_gib is None else a.budget_gib
    results: dict = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "python": platform.python_version(),
                     "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                     "big_model": big, "budget_gib_per_rank": budget}

    # 1. ZeRO-0 for the big model: refused by the plan before anything is built
    rc, out, secs = launch(big, 0, a.logs, "big-z0", 2, None if a.smoke else a.big_size, 1, 900, budget)
    # torchrun reports a failed rank as exit 1 whatever its code (2 here); the message says why
    refused = rc != 0 and "exceeds" in out and "trainable params" not in out  # no model was built
    results["big_zero0"] = {"exit": rc, "refused_up_front": refused, "seconds": round(secs, 1),
                            "message": next((ln for ln in out.splitlines() if "dsclip: error" in ln), "")}
    print(f"{big} ZeRO-0: exit {rc} in {secs:.0f}s, refused up front: {refused}")
    print(f"  {results['big_zero0']['message']}")

    # 2. ZeRO-3 for the big model: 2 training steps
    rc, out, secs = launch(big, 3, a.logs, "big-z3", 2, None if a.smoke else a.big_size, 1, 3000, budget)
    mem = memory(out)
    results["big_zero3"] = {"exit": rc, "seconds": round(secs, 1), "peak_rss_gib": {r: m[0] for r, m in mem.items()},
                            "train_state_gib": {r: m[1] for r, m in mem.items()},
                            "plan_estimate_gib": plan_gib(big, 3, 1, None if a.smoke else a.big_size)}
    print(f"{big} ZeRO-3: exit {rc} in {secs:.0f}s, per-rank peak RSS "
          + ", ".join(f"rank {r} {m[0]:.2f} GiB" for r, m in mem.items()))
    if rc != 0:
        print(out[-3000:])

    # 3. ViT-B-32: ZeRO-3 vs ZeRO-0 per-rank memory
    per_stage = {}
    for stage in (0, 3):
        rc, out, _ = launch(ratio_model, stage, a.logs, f"ratio-z{stage}", 2, None, 4, 1800)
        per_stage[stage] = memory(out)
        if rc != 0:
            print(out[-3000:])
    if per_stage[0] and per_stage[3]:
        added = {s: max(m[1] for m in per_stage[s].values()) for s in per_stage}
        peak = {s: max(m[0] for m in per_stage[s].values()) for s in per_stage}
        results["ratio"] = {"model": ratio_model, "train_state_gib": added, "peak_rss_gib": peak,
                            "plan_estimate_gib": {s: plan_gib(ratio_model, s, 4, None) for s in per_stage},
                            "zero3_over_zero0_train_state": added[3] / added[0],
                            "zero3_over_zero0_peak_rss": peak[3] / peak[0]}
        print(f"{ratio_model} per-rank ZeRO-3/ZeRO-0: training state {added[3] / added[0]:.2f} "
              f"(target <= 0.55), whole-process peak RSS {peak[3] / peak[0]:.2f}")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "scale.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(a.out, "scale.md"), "w") as fh:
        fh.write(report_md(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
