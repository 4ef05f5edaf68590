"""The guards inside a real training run (1 process): a base model learns the synthetic classes,
then a fine-tune at a destructive lr forgets them, and ``--early-stop forget`` ends it at the
first evaluation, with a complete checkpoint and export.  The base run also logs to W&B in
offline mode (no network) next to TensorBoard."""

from __future__ import annotations

import json
import os

import pytest

from tests.launch import cpu_env, launch_many, tiny_args

pytestmark = pytest.mark.dist


def _synthetic_zeroshot_set(root) -> str:
    """The first 16 synthetic classes (colour x shape) as class folders, 3 images each, with the
    captions' own wording as the template."""
    from PIL import Image

    from dsclip.data.synthetic import COLOURS, SHAPES, synthetic_sample

    names = [f"{c} {s}" for c in COLOURS[:4] for s in SHAPES]
    got = {n: 0 for n in names}
    i = 0
    while min(got.values()) < 3:
        img, caption = synthetic_sample(99, i, (32, 32))
        i += 1
        name = caption[len("a "):]
        if name in got and got[name] < 3:
            folder = root / f"{names.index(name):02d}"
            folder.mkdir(parents=True, exist_ok=True)
            arr = ((img.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(folder / f"{got[name]}.png")
            got[name] += 1
    (root / "classnames.txt").write_text("\n".join(names) + "\n")
    (root / "templates.txt").write_text("a {}\n")
    return str(root)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def guarded_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    zs = _synthetic_zeroshot_set(root / "zs")
    common = ["--zeroshot-data", f"zs={zs}", "--val-frequency", "0", "--val-num-samples", "32", "--batch-size", "16",
              "--threads", "2"]
    runs = {
        "base": (tiny_args(str(root), "base", *common, "--train-num-samples", "512", "--lr", "2e-3", "--no-baseline-eval",
                           "--report-to", "tensorboard,wandb"),
                 {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}),
        "forget": tiny_args(str(root), "forget", *common, "--pretrained", str(root / "base" / "final.safetensors"),
                            "--train-num-samples", "256", "--lr", "0.5", "--warmup", "0", "--eval-every-n-steps",
                            "2", "--early-stop", "forget", "--forget-threshold", "2", "--save-every-n-steps", "4"),
    }
    results, _ = launch_many(runs, nproc=1, timeout=600, env=cpu_env())
    return root, results


def test_forgetting_stops_the_run_at_the_first_evaluation(guarded_runs):
    root, results = guarded_runs
    base, forget = results["base"], results["forget"]
    assert base.returncode == 0, base.stdout[-3000:]
    assert forget.returncode == 0, forget.stdout[-3000:]
    base_top1 = [r for r in _records(root / "base") if r["kind"] == "eval"][-1]["zeroshot/zs/top1"]
    assert base_top1 >= 2 / 16  # the base model learned something to forget (chance is 1/16)

    recs = _records(root / "forget")
    evals = [r for r in recs if r["kind"] in ("baseline", "eval")]
    assert evals[0]["kind"] == "baseline" and evals[0]["zeroshot/zs/top1"] == pytest.approx(base_top1)
    assert [r["step"] for r in evals] == [0, 2]  # stopped after the first evaluation, of 16 steps
    assert "WARNING: forgetting: zero-shot top-1 on zs" in forget.stdout
    assert "early stop (--early-stop forget) at step 2" in forget.stdout
    assert "done: 2 steps" in forget.stdout
    ckpts = root / "forget" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002" and (root / "forget" / "final.safetensors").exists()


def test_wandb_offline_run_holds_the_eval_scalars(guarded_runs):
    root, results = guarded_runs
    assert results["base"].returncode == 0, results["base"].stdout[-3000:]
    runs = list((root / "base" / "wandb").glob("offline-run-*"))  # W&B's files live in the run dir
    assert len(runs) == 1, os.listdir(root / "base")
    logs = list(runs[0].glob("*.wandb"))
    assert logs and all(k.encode() in logs[0].read_bytes() for k in ("zeroshot/zs/top1", "train/loss"))
    assert (root / "base" / "wandb_id.txt").read_text().strip() in runs[0].name
