"""``dsclip demo``: the whole fine-tuning story in one command, on generated data.

1. Draws a small captioned dataset with two visual domains: A, "photos" (filled coloured
   shapes on a light background), and B, "negatives" (the same photos with inverted colours and
   film grain).  Nothing is downloaded.  Training data goes to WebDataset shards, zero-shot
   sets to class folders.
2. Trains a tiny CLIP from scratch on A: the stand-in for a pretrained model.
3. Fine-tunes it on B under ZeRO-2 with the real trainer (``torchrun`` over every local GPU, or
   two gloo ranks on CPU), evaluating zero-shot accuracy on A and B before and after.
4. Sweeps WiSE-FT between the two weights and plots the A/B trade-off.

``--quick`` shrinks everything for tests.  Exit code 0 only when fine-tuning raised B's accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageOps

from .config import ConfigError

# the tiny open_clip model: a few MB, trains in seconds per epoch on CPU
TINY_MODEL = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# complementary pairs, so a negative of one colour looks like another class
COLOURS = {
    "red": (225, 35, 35),
    "green": (35, 190, 50),
    "blue": (45, 70, 225),
    "cyan": (30, 220, 220),
    "magenta": (220, 65, 205),
    "yellow": (210, 185, 30),
}
SHAPES = ("circle", "square")
DOMAINS = {"A": "photo", "B": "negative"}
IMAGE_SIZE = 32
_DRAW_SCALE = 4  # draw large, then downsample: anti-aliased edges


@dataclass
class DemoSizes:
    train_a: int  # training samples of domain A (base model)
    train_b: int  # training samples of domain B (fine-tuning)
    eval_per_class: int  # zero-shot images per class and domain
    base_epochs: int
    ft_epochs: int
    batch_size: int = 16


FULL = DemoSizes(train_a=1536, train_b=512, eval_per_class=20, base_epochs=3, ft_epochs=3)
QUICK = DemoSizes(train_a=1536, train_b=512, eval_per_class=12, base_epochs=3, ft_epochs=3)


def classes() -> list[tuple[str, str]]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


# ---------------------------------------------------------------- the generated dataset


def draw(colour: str, shape: str, domain: str, rng: random.Random) -> Image.Image:
    """One 32x32 image: a filled shape on a light background ("A", a photo) or the photo's
    negative with film grain ("B").  Position, size and shade are jittered."""
    s = IMAGE_SIZE * _DRAW_SCALE
    rgb = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    base = rng.randint(205, 245)
    im = Image.new("RGB", (s, s), (base, base, base - rng.randint(0, 15)))
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.22, 0.36) * s
    cx, cy = rng.uniform(r + 4, s - r - 4), rng.uniform(r + 4, s - r - 4)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    else:
        h = r * 0.85
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
    im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    if domain == "B":
        # a negative swaps every colour for its complement, which is another class here: a
        # photo-trained model reads a red negative as cyan
        grain = Image.effect_noise((IMAGE_SIZE, IMAGE_SIZE), 40).convert("RGB")
        im = Image.blend(ImageOps.invert(im), grain, 0.15)
    return im


def caption(colour: str, shape: str, domain: str) -> str:
    return f"a {DOMAINS[domain]} of a {colour} {shape}"


def train_samples(domain: str, n: int, seed: int) -> Iterator[tuple[str, Image.Image, str, dict]]:
    rng = random.Random(f"{seed}-train-{domain}")
    cls = classes()
    for i in range(n):
        colour, shape = cls[rng.randrange(len(cls))]
        yield (
            f"{domain}{i:06d}",
            draw(colour, shape, domain, rng),
            caption(colour, shape, domain),
            {"domain": domain},
        )


def write_zeroshot_set(root: str, domain: str, per_class: int, seed: int) -> str:
    """Class folders plus ``classnames.txt`` and ``templates.txt`` (the domain's caption style)."""
    rng = random.Random(f"{seed}-eval-{domain}")
    cls = classes()
    for idx, (colour, shape) in enumerate(cls):
        folder = os.path.join(root, f"{idx:02d}_{colour}_{shape}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            draw(colour, shape, domain, rng).save(os.path.join(folder, f"{i:04d}.png"))
    with open(os.path.join(root, "classnames.txt"), "w") as fh:
        fh.write("".join(f"{colour} {shape}\n" for colour, shape in cls))
    with open(os.path.join(root, "templates.txt"), "w") as fh:
        fh.write(f"a {DOMAINS[domain]} of a {{}}\n")
    return root


def make_dataset(data_dir: str, sizes: DemoSizes, seed: int, log=print) -> dict[str, str]:
    """Train shards for A and B and zero-shot folders; returns their paths (shard patterns)."""
    from .data.shards import write_shards

    paths = {}
    for domain, n in (("A", sizes.train_a), ("B", sizes.train_b)):
        out = os.path.join(data_dir, f"train_{domain}")
        summary = write_shards(train_samples(domain, n, seed), out, samples_per_shard=256)
        paths[f"train_{domain}"] = os.path.join(out, f"shard-{{000000..{len(summary.shards) - 1:06d}}}.tar")
        paths[f"n_{domain}"] = str(summary.samples)
        log(f"[demo] {summary.line(out)}")
        paths[f"eval_{domain}"] = write_zeroshot_set(
            os.path.join(data_dir, f"eval_{domain}"), domain, sizes.eval_per_class, seed
        )
    log(
        f"[demo] zero-shot sets: {len(classes())} classes x {sizes.eval_per_class} images per domain in "
        f"{data_dir}/eval_A (photos) and {data_dir}/eval_B (negatives)"
    )
    return paths


# ---------------------------------------------------------------- launching the trainer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def _show(line: str) -> bool:
    """The trainer lines worth streaming: its own messages, progress and errors."""
    return line.startswith(("[dsclip]", "epoch ", "dsclip: error", "Traceback")) or "Error" in line


def launch_train(args: list[str], nproc: int, log=print) -> None:
    """Run ``dsclip/train.py`` under torchrun, streaming its progress; raise on failure."""
    import torch

    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        train_py,
        *args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    tail: deque[str] = deque(maxlen=60)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            if _show(line):
                log("    " + line)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"training failed (exit code {code}); last output:\n" + "\n".join(tail))


def read_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "results.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def zeroshot_before_after(run_dir: str) -> tuple[dict[str, float], dict[str, float]]:
    """(baseline, last eval) zero-shot top-1 per domain from the run's ``results.jsonl``."""
    recs = read_records(run_dir)
    base = [r for r in recs if r.get("kind") == "baseline"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    if not base or not evals:
        raise RuntimeError(f"{run_dir}/results.jsonl has no baseline and final zero-shot evaluation")

    def top1(r: dict) -> dict[str, float]:
        return {d: r[f"zeroshot/{d}/top1"] for d in DOMAINS}

    return top1(base[0]), top1(evals[-1])


# ---------------------------------------------------------------- the story


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsclip demo",
        description="End-to-end CLIP fine-tuning demo on generated "
        "data: pretrain on photos, fine-tune on negatives (ZeRO-2), WiSE-FT sweep.",
    )
    p.add_argument("--out", default="./dsclip-demo", help="work directory (default: ./dsclip-demo)")
    p.add_argument("--quick", action="store_true", help="smaller data and fewer steps (for tests)")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: local GPUs, or 2 CPU ranks)")
    p.add_argument("--base-epochs", type=int, default=None, help="epochs of base training on photos")
    p.add_argument("--ft-epochs", type=int, default=None, help="epochs of fine-tuning on negatives")
    p.add_argument("--seed", type=int, default=0, help="data and training seed")
    return p


def common_train_args(sizes: DemoSizes, model_json: str, logs: str, seed: int) -> list[str]:
    return [
        "--model",
        model_json,
        "--dataset-type",
        "webdataset",
        "--batch-size",
        str(sizes.batch_size),
        "--wd",
        "0.1",
        "--precision",
        "fp32",
        "--workers",
        "1",
        "--logs-dir",
        logs,
        "--val-frequency",
        "0",
        "--log-every-n-steps",
        "20",
        "--seed",
        str(seed),
        "--save-frequency",
        "0",
        "--keep-last-n",
        "1",
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.base_epochs:
        sizes = DemoSizes(**{**sizes.__dict__, "base_epochs": args.base_epochs})
    if args.ft_epochs:
        sizes = DemoSizes(**{**sizes.__dict__, "ft_epochs": args.ft_epochs})
    nproc = args.nproc or default_nproc()
    out = os.path.abspath(args.out)
    logs = os.path.join(out, "runs")
    start = time.time()

    def step(title: str) -> None:
        print(f"\n== [{time.time() - start:5.0f}s] {title}", flush=True)

    try:
        for name in ("base", "finetune"):
            if os.path.exists(os.path.join(logs, name, "final.safetensors")):
                raise ConfigError(f"{out} already holds a demo run; pass a new --out or delete it")
        os.makedirs(logs, exist_ok=True)
        model_json = os.path.join(out, "tiny-clip.json")
        with open(model_json, "w") as fh:
            json.dump(TINY_MODEL, fh, indent=1)

        step("1/4 generating data: coloured shapes as photos (A) and negatives (B)")
        paths = make_dataset(os.path.join(out, "data"), sizes, args.seed)
        zs_data = f"A={paths['eval_A']},B={paths['eval_B']}"
        common = common_train_args(sizes, model_json, logs, args.seed)

        step(f"2/4 training the base model on photos (A) from scratch, {nproc} rank(s)")
        launch_train(
            [
                *common,
                "--name",
                "base",
                "--train-data",
                paths["train_A"],
                "--train-num-samples",
                paths["n_A"],
                "--epochs",
                str(sizes.base_epochs),
                "--lr",
                "2e-3",
                "--warmup",
                "20",
                "--zeroshot-frequency",
                "0",
                "--no-baseline-eval",
            ],
            nproc,
        )
        base_weights = os.path.join(logs, "base", "final.safetensors")

        step("3/4 fine-tuning the base model on negatives (B) under ZeRO-2, zero-shot eval on A and B")
        launch_train(
            [
                *common,
                "--name",
                "finetune",
                "--pretrained",
                base_weights,
                "--train-data",
                paths["train_B"],
                "--train-num-samples",
                paths["n_B"],
                "--epochs",
                str(sizes.ft_epochs),
                "--lr",
                "5e-4",
                "--warmup",
                "10",
                "--zeroshot-data",
                zs_data,
                "--zeroshot-frequency",
                "1",
            ],
            nproc,
        )
        ft_dir = os.path.join(logs, "finetune")
        ft_weights = os.path.join(ft_dir, "final.safetensors")
        before, after = zeroshot_before_after(ft_dir)

        step("4/4 WiSE-FT: interpolating base and fine-tuned weights")
        from . import wiseft

        wise_dir = os.path.join(out, "wiseft")
        code = wiseft.main(
            [
                "--zeroshot",
                base_weights,
                "--finetuned",
                ft_weights,
                "--alphas",
                "0:1:0.25",
                "--zeroshot-data",
                zs_data,
                "--model",
                model_json,
                "--out",
                wise_dir,
                "--id-metric",
                "zeroshot/B/top1",
                "--ood-metrics",
                "zeroshot/A/top1",
                "--workers",
                "0",
                "--device",
                "cpu",
            ]
        )
        if code:
            raise RuntimeError(f"the WiSE-FT sweep failed (exit code {code})")
        with open(os.path.join(wise_dir, "results.jsonl")) as fh:
            sweep = [json.loads(line) for line in fh if line.strip()]
        with open(os.path.join(wise_dir, "wiseft_best.json")) as fh:
            best = json.load(fh)
    except ConfigError as e:
        print(f"dsclip demo: error: {e}", file=sys.stderr)
        return 2

    print(report(before, after, sweep, best, time.time() - start))
    print(where(out, logs, wise_dir, best))
    if after["B"] <= before["B"]:
        raise RuntimeError(
            f"fine-tuning on negatives did not raise their zero-shot accuracy "
            f"({100 * before['B']:.1f}% -> {100 * after['B']:.1f}%); see {ft_dir}"
        )
    return 0


def report(
    before: dict[str, float], after: dict[str, float], sweep: list[dict], best: dict, seconds: float
) -> str:
    chance = 100 / len(classes())
    lines = [
        "",
        f"== results ({seconds:.0f}s; {len(classes())} classes, chance {chance:.1f}%)",
        f"{'zero-shot top-1':<24}{'A: photos':>11}{'B: negatives':>13}",
        f"{'base (trained on A)':<24}{100 * before['A']:10.1f}%{100 * before['B']:12.1f}%",
        f"{'fine-tuned on B':<24}{100 * after['A']:10.1f}%{100 * after['B']:12.1f}%",
        "",
        "WiSE-FT: weights = (1 - alpha) * base + alpha * fine-tuned",
        f"{'alpha':>6}{'A: photos':>11}{'B: negatives':>13}",
    ]
    for r in sweep:
        mark = "  <- chosen" if r["alpha"] == best["alpha"] else ""
        lines.append(
            f"{r['alpha']:6.2f}{100 * r['zeroshot/A/top1']:10.1f}%{100 * r['zeroshot/B/top1']:12.1f}%{mark}"
        )
    return "\n".join(lines)


def where(out: str, logs: str, wise_dir: str, best: dict) -> str:
    return "\n".join(
        [
            "",
            "== where things are",
            f"work dir        {out}",
            f"base run        {logs}/base",
            f"fine-tune run   {logs}/finetune  (results.jsonl, params.yaml, checkpoints/)",
            f"exports         {logs}/base/final.safetensors, {logs}/finetune/final.safetensors,",
            f"                {best.get('weights')}",
            f"WiSE-FT plot    {wise_dir}/wiseft.png  (table: {wise_dir}/wiseft.csv)",
            f"TensorBoard     tensorboard --logdir {logs}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
