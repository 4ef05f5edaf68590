"""Hardware efficiency of dsclip training: achieved model FLOP/s over dense-matmul peak FLOP/s.

* FLOPs per training sample: ``torch.utils.flop_counter.FlopCounterMode`` over the forward and
  backward of the open_clip model (both towers) on a small batch, divided by the batch.
* Achieved: samples/s of real dsclip training steps (1 rank, ZeRO-2, fp32, synthetic data,
  median over the steps after the warm-up one) x FLOPs per sample.
* Peak: the best fp32 FLOP/s of ``torch.mm`` on the model's dominant matmul shapes (QKV, MLP up
  and down, for the image and text towers at this batch), with the same thread count, measured in
  this run before and after training (the better of the two is used, so the ratio is conservative).

Target: >= 50% for a ViT-B-32-sized model at batch 32 per rank on CPU.

Usage:  python benchmarks/efficiency.py [--smoke] [--model M] [--batch-size B] [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DEFAULT_OUT,
    TINY_MODEL,
    format_breakdown,
    launch_dsclip,
    matmul_peak,
    md_table,
    write_report,
)

TARGET = 0.50


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=32, help="per rank (one rank)")
    p.add_argument("--steps", type=int, default=4, help="training steps; the first is warm-up")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.batch_size, a.steps = TINY_MODEL, 16, 3
    return a


def flops_per_sample(model_name: str, batch: int = 2) -> tuple[float, dict]:
    """Forward + backward FLOPs of one training sample, and the model config (for the shapes)."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dsclip.model import model_config, register_model

    name = register_model(model_name)
    model = open_clip.create_model(name, output_dict=True)
    cfg = model_config(name)
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(batch, 3, *size)
    texts = torch.randint(0, cfg["text_cfg"].get("vocab_size", 49408), (batch, cfg["text_cfg"]["context_length"]))
    with FlopCounterMode(display=False) as counter:
        out = model(image=images, text=texts)
        loss = (out["image_features"] @ out["text_features"].T).logsumexp(-1).mean()
        loss.backward()
    return counter.get_total_flops() / batch, cfg


def dominant_shapes(cfg: dict, batch: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the QKV, MLP-up and MLP-down matmuls of each tower at this batch."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    img = v["image_size"] if isinstance(v["image_size"], int) else v["image_size"][0]
    tokens_v = batch * ((img // v["patch_size"]) ** 2 + 1)
    tokens_t = batch * t["context_length"]
    shapes = []
    for m, w, r in ((tokens_v, v["width"], v.get("mlp_ratio", 4.0)), (tokens_t, t["width"], t.get("mlp_ratio", 4.0))):
        h = int(w * r)
        shapes += [(m, w, 3 * w), (m, w, h), (m, h, w)]
    return shapes


def main(argv: list[str] | None = None) -> dict:
    a = parse(argv)
    fps, cfg = flops_per_sample(a.model)
    shapes = dominant_shapes(cfg, a.batch_size)
    before = matmul_peak(shapes, a.threads, repeats=3 if a.smoke else 5)
    train = launch_dsclip(a.model, a.batch_size, a.steps, "zero2", nproc=1, threads=a.threads)
    after = matmul_peak(shapes, a.threads, repeats=3 if a.smoke else 5)
    rows = [{"shape": b["shape"], "before_gflops": b["best_flops"] / 1e9, "after_gflops": c["best_flops"] / 1e9}
            for b, c in zip(before, after)]
    peak = max(max(b["best_flops"], c["best_flops"]) for b, c in zip(before, after))
    achieved = train["samples_per_s"] * fps
    ratio = achieved / peak
    print(f"model {a.model}: {fps / 1e9:.2f} GFLOP per training sample (forward+backward)")
    print(f"dsclip training: {train['samples_per_s']:.2f} samples/s at batch {a.batch_size}, {a.threads} threads "
          f"-> {achieved / 1e9:.1f} GFLOP/s")
    print(f"fp32 matmul peak on the dominant shapes: {peak / 1e9:.1f} GFLOP/s")
    print(f"efficiency (achieved/peak): {100 * ratio:.1f}% (target >= {100 * TARGET:.0f}%)")
    print(f"step breakdown: {format_breakdown(train['breakdown'])}")
    config = {"model": a.model, "batch_per_rank": a.batch_size, "ranks": 1, "zero": 2, "threads": a.threads,
              "steps": a.steps, "warmup_steps": 1, "precision": "fp32", "smoke": a.smoke}
    results = {"efficiency": ratio, "target": TARGET, "flops_per_sample": fps, "samples_per_s": train["samples_per_s"],
               "samples_per_s_steps": train["samples_per_s_steps"], "achieved_flops": achieved, "peak_flops": peak,
               "matmul": rows, "breakdown": train["breakdown"]}
    sections = [(f"Achieved {achieved / 1e9:.1f} GFLOP/s of {peak / 1e9:.1f} GFLOP/s matmul peak: **{100 * ratio:.1f}%** "
                f"(target >= {100 * TARGET:.0f}%). {fps / 1e9:.2f} GFLOP per sample, "
                f"{train['samples_per_s']:.2f} samples/s."), md_table(rows, ["shape", "before_gflops", "after_gflops"])]
    write_report(a.out, "efficiency", "Training efficiency (model FLOP/s over matmul peak)", config, results, sections)
    return results


if __name__ == "__main__":
    main()
