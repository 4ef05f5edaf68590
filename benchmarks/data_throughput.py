"""Loader-only throughput of the WebDataset source: S3 vs local disk, and loader vs training.

1. The same shards (256 px JPEGs, preprocessed to 224 px with the training transform) are read
   from local disk and from S3 (moto's server on 127.0.0.1, spoken to over HTTP through s3fs),
   with 1 and 2 DataLoader workers.  Throughput is samples/s over whole epochs (shuffle-buffer
   fill included) once the persistent workers have started, median over the repeats.  Local
   and S3 epochs alternate, and the S3/local ratio is the median of back-to-back pairs, so
   load from other processes hits both alike.  Target: S3/local >= 0.9.  Note that moto runs
   inside this process: the S3 path pays for the server's CPU as well as the client's.
2. The tiny test model (``tests/assets/tiny-clip.json``, 32 px) is timed for a full training
   step (forward, CLIP loss, backward, AdamW) at batch 32; its consumption in samples/s is
   compared with the loader's throughput on 32 px shards (40 px JPEGs, 32 px transform).
   Target: loader/step >= 3, i.e. the loader is never what the step waits for.

Loader and model run one after the other, never together, so each gets the whole machine.

Usage:  python benchmarks/data_throughput.py [--smoke] [--repeats N] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from dsclip.config import Config
from dsclip.data.shards import write_shards
from dsclip.data.wds import WebDatasetSource
from tests.s3_server import MotoS3

TINY_MODEL = ROOT / "tests" / "assets" / "tiny-clip.json"
BATCH = 32


def photo_like(seed: int, size: int) -> Image.Image:
    """Smooth colour fields plus mild noise: JPEG sizes like photos (~15-30 KB at 256 px)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 4, 3)) * 255
    img = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC),
                     dtype=np.float32)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_shards(folder: str, n: int, size: int, per_shard: int) -> tuple[str, int]:
    samples = ((f"{i:07d}", photo_like(i, size), f"a photo of thing {i % 97} in colour {i % 13}") for i in range(n))
    summary = write_shards(samples, folder, per_shard, quality=90)
    nbytes = sum(os.path.getsize(p) for p in summary.shards)
    return os.path.join(folder, f"shard-{{000000..{len(summary.shards) - 1:06d}}}.tar"), nbytes


def loader_rates(urls: dict[str, str], image_size: int, workers: int, repeats: int, tokenizer) -> dict:
    """Samples/s of whole epochs per source, after the (persistent) workers have started.

    The sources take turns epoch by epoch, so a change in machine load hits them alike."""
    preprocess = open_clip.image_transform(image_size, is_train=True)
    sources = {}
    for name, url in urls.items():
        cfg = Config()
        cfg.data.train_data, cfg.data.workers, cfg.data.shuffle_buffer = url, workers, 256
        sources[name] = WebDatasetSource(cfg, "train", preprocess, tokenizer, 0, 1, BATCH)
        next(iter(sources[name].batches(0)))  # start the workers; not timed
    rates: dict[str, list[float]] = {name: [] for name in urls}
    for epoch in range(1, repeats + 1):
        for name, src in sources.items():
            start, n = time.perf_counter(), 0
            for batch in src.batches(epoch):
                n += batch["image"].shape[0]
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def step_rate(steps: int) -> tuple[list[float], int]:
    """Samples/s of full training steps of the tiny model at batch 32, with whichever of 1 or all
    cores' threads is faster (the faster the step, the harder the loader's target)."""
    best: tuple[list[float], int] = ([0.0], 1)
    saved = torch.get_num_threads()
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        rates = _steps(steps)
        if statistics.median(rates) > statistics.median(best[0]):
            best = (rates, threads)
    torch.set_num_threads(saved)
    return best


def _steps(steps: int) -> list[float]:
    open_clip.add_model_config(str(TINY_MODEL))
    model = open_clip.create_model(TINY_MODEL.stem)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(BATCH, 3, 32, 32)
    texts = torch.randint(0, 49408, (BATCH, 16))
    labels = torch.arange(BATCH)
    rates = []
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        out = model(images, texts)
        img, txt, scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
            if isinstance(out, dict) else out[:3]
        logits = scale * img @ txt.t()
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:
            rates.append(BATCH / (time.perf_counter() - start))
    return rates


def versions() -> dict:
    import moto
    import PIL
    import s3fs

    return {"python": platform.python_version(), "torch": torch.__version__, "open_clip": open_clip.__version__,
            "s3fs": s3fs.__version__, "moto": moto.__version__, "pillow": PIL.__version__}


def hardware() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def run(smoke: bool, repeats: int) -> dict:
    n224, per224 = (64, 32) if smoke else (640, 64)
    n32, per32 = (256, 128) if smoke else (4096, 256)
    steps = 3 if smoke else 20
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    server = MotoS3()
    server.start()
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint})
    results: dict = {"config": {"batch_size": BATCH, "samples_224": n224, "samples_32": n32, "repeats": repeats,
                                "model_steps": steps, "shuffle_buffer": 256, "smoke": smoke}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local224, bytes224 = make_shards(os.path.join(tmp, "s224"), n224, 256, per224)
            local32, _ = make_shards(os.path.join(tmp, "s32"), n32, 40, per32)
            bucket = server.new_bucket("bench")
            server.upload_dir(os.path.join(tmp, "s224"), bucket, "s224")
            s3_224 = f"s3://{bucket}/s224/" + os.path.basename(local224)
            results["config"]["mean_jpeg_kb_224"] = round(bytes224 / n224 / 1024, 1)
            rates: dict = {}
            pair_ratios = {}
            for workers in (1, 2):
                both = loader_rates({"local": local224, "s3": s3_224}, 224, workers, repeats, tokenizer)
                rates[f"local_224_w{workers}"], rates[f"s3_224_w{workers}"] = both["local"], both["s3"]
                pair_ratios[f"w{workers}"] = [s / loc for s, loc in zip(both["s3"], both["local"])]
                rates[f"local_32_w{workers}"] = loader_rates({"local": local32}, 32, workers, repeats,
                                                             tokenizer)["local"]
            rates["tiny_model_step_32"], results["config"]["model_threads"] = step_rate(steps)
    finally:
        server.stop()
    med = {k: statistics.median(v) for k, v in rates.items()}
    results["samples_per_s"] = {k: round(v, 1) for k, v in med.items()}
    results["samples_per_s_all"] = {k: [round(x, 1) for x in v] for k, v in rates.items()}
    # median of the per-epoch ratios of back-to-back epochs (robust to drifting load)
    results["s3_local_ratio"] = {w: round(statistics.median(r), 3) for w, r in pair_ratios.items()}
    results["loader_step_ratio"] = {f"w{w}": round(med[f"local_32_w{w}"] / med["tiny_model_step_32"], 2)
                                    for w in (1, 2)}
    results["targets"] = {"s3_local_ratio": 0.9, "loader_step_ratio": 3.0}
    return results


def markdown(r: dict) -> str:
    h, v, c, s = r["hardware"], r["versions"], r["config"], r["samples_per_s"]
    lines = [
        "# Data loader throughput: S3 vs local disk, loader vs training step", "",
        (f"{h['cores']} CPUs ({h['cpu']}), load average at start {h['load_average']}, "
         f"python {v['python']}, torch {v['torch']}, open_clip {v['open_clip']}, s3fs {v['s3fs']}, "
         f"moto {v['moto']}, pillow {v['pillow']}, {r['date']}."), "",
        (f"Batch {c['batch_size']}; 224 px: {c['samples_224']} samples of 256 px JPEG "
         f"(~{c.get('mean_jpeg_kb_224', '?')} KB) per epoch; 32 px: {c['samples_32']} samples of 40 px JPEG. "
         f"Samples/s of whole epochs after worker start-up, median of {c['repeats']} epochs; local and S3 "
         f"epochs alternate and S3/local is the median ratio of back-to-back epochs; "
         f"S3 is moto's server on 127.0.0.1 over HTTP via s3fs, in the benchmark's own process (its CPU "
         f"counts against S3). The step is forward + CLIP loss + backward "
         f"+ AdamW of tests/assets/tiny-clip.json at 32 px, median of {c['model_steps']} steps "
         f"({c.get('model_threads', '?')} thread(s), the faster of 1 and all cores). "
         "Wall-clock on a shared machine: treat as rough."), "",
        "| workers | local 224 px | S3 224 px | S3/local | local 32 px | tiny-model step | loader/step |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in (1, 2):
        lines.append(f"| {w} | {s[f'local_224_w{w}']} | {s[f's3_224_w{w}']} | {r['s3_local_ratio'][f'w{w}']} | "
                     f"{s[f'local_32_w{w}']} | {s['tiny_model_step_32']} | {r['loader_step_ratio'][f'w{w}']} |")
    lines += ["", (f"Targets: S3/local >= {r['targets']['s3_local_ratio']}, "
                   f"loader/step >= {r['targets']['loader_step_ratio']}."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat (< 30 s)")
    p.add_argument("--repeats", type=int, default=None, help="epochs per setting (default: 5, smoke: 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where the .json/.md go")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 5)
    started = time.time()
    hw = hardware()
    r = run(args.smoke, repeats)
    r["hardware"], r["versions"] = hw, versions()
    r["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    r["seconds"] = round(time.time() - started, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data_throughput.json"), "w") as fh:
        json.dump(r, fh, indent=1)
    with open(os.path.join(args.out, "data_throughput.md"), "w") as fh:
        fh.write(markdown(r))
    for key, value in r["samples_per_s"].items():
        print(f"{key}: {value} samples/s")
    for w in ("w1", "w2"):
        print(f"s3_local_ratio[{w}]: {r['s3_local_ratio'][w]:.3f} (target >= 0.9)")
        print(f"loader_step_ratio[{w}]: {r['loader_step_ratio'][w]:.2f} (target >= 3)")
    print(f"wrote {args.out}/data_throughput.json and .md in {r['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
