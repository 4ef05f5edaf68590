"""Evaluation inside real 2-rank ZeRO-3 training (deepspeed launcher, gloo on CPU).

Every parameter is partitioned (persistence threshold 0) and the zero-shot shards split
unevenly over the ranks, so a rank that runs out of batches must keep calling forward; a
mistake there hangs the job.  The step-0 baseline must equal a single-process evaluation of
the same pretrained weights, and the eval scalars must reach results.jsonl and TensorBoard.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from dsclip.config import Config
from dsclip.evaluate import Evaluator
from tests.launch import launch_train, tiny_args
from tests.test_eval_helpers import CLASSES, TINY, draw, make_shards, tiny_model

pytestmark = pytest.mark.dist


def _val_csv(root: str, n: int = 24) -> str:
    os.makedirs(os.path.join(root, "img"), exist_ok=True)
    lines = ["filepath\ttitle"]
    for i in range(n):
        label = i % len(CLASSES)
        draw(label, 100 + i).save(os.path.join(root, "img", f"{i:03d}.png"))
        lines.append(f"img/{i:03d}.png\ta {CLASSES[label]} picture number {i}")  # unique captions: no ties
    path = os.path.join(root, "val.tsv")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def _ds_config(root: str) -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "ds_configs", "zero3.json")) as fh:
        cfg = json.load(fh)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = os.path.join(root, "zero3_all_partitioned.json")
    with open(path, "w") as fh:
        json.dump(cfg, fh)
    return path


def _single_process_baseline(weights: str, zs_spec: str, val_csv: str) -> dict[str, float]:
    model, pre, tok = tiny_model(weights=weights)
    cfg = Config()
    cfg.eval.zeroshot_data, cfg.data.val_data = zs_spec, val_csv
    cfg.optim.batch_size, cfg.data.workers = 4, 0
    return Evaluator(cfg, tok, pre, 32, 0, 1, None, "cpu").evaluate(model)


def test_zero3_training_evaluates(tmp_path):
    root = str(tmp_path)
    model, _, _ = tiny_model(seed=5)
    weights = os.path.join(root, "pretrained.pt")
    torch.save(model.state_dict(), weights)
    shards = make_shards(os.path.join(root, "shards"), sizes=(7, 5, 4), n_classes=7)
    val = _val_csv(os.path.join(root, "val"))
    zs_spec = f"sh={shards}/shard-{{000..002}}.tar"
    args = tiny_args(
        os.path.join(root, "runs"),
        "z3eval",
        "--ds_config",
        _ds_config(root),
        "--pretrained",
        weights,
        "--dataset-type",
        "auto",
        "--train-num-samples",
        "32",
        "--zeroshot-data",
        zs_spec,
        "--val-data",
        val,
        "--eval-every-n-steps",
        "2",
        "--keep-best",
        "val/loss",
    )
    proc = launch_train(args, nproc=2, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    run_dir = os.path.join(root, "runs", "z3eval")

    with open(os.path.join(run_dir, "results.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    evals = [r for r in records if r["kind"] in ("baseline", "eval")]
    assert [(r["kind"], r["step"]) for r in evals] == [("baseline", 0), ("eval", 2), ("eval", 4)]
    assert all("zeroshot/sh/top1" in r and "val/loss" in r for r in evals)

    # the ZeRO-3 baseline equals a plain single-process evaluation of the same weights
    ref = _single_process_baseline(weights, zs_spec, val)
    base = evals[0]
    assert base["zeroshot/sh/num_samples"] == 16 and base["val/num_samples"] == 24
    for k, v in ref.items():
        tol = 1e-4 if k == "val/loss" else 0
        assert math.isclose(base[k], v, rel_tol=tol, abs_tol=tol), (k, base[k], v)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"zeroshot/sh/top1", "zeroshot/sh/top5", "val/loss", "val/image_to_text_R@1", "train/loss"} <= set(
        tags
    )
    assert [e.step for e in acc.Scalars("val/loss")] == [0, 2, 4]

    # WiSE-FT reads the ZeRO-3 checkpoint: alpha 1 is the consolidated final weights, bit for bit
    from dsclip import wiseft

    out = os.path.join(root, "wiseft")
    assert (
        wiseft.main(
            ["--zeroshot", weights, "--finetuned", run_dir, "--model", TINY, "--alphas", "1", "--out", out]
        )
        == 0
    )
    exported = load_file(os.path.join(out, "wiseft_alpha1.safetensors"))
    final = load_file(os.path.join(run_dir, "final.safetensors"))
    assert exported.keys() == final.keys() and all(torch.equal(exported[k], final[k]) for k in final)
