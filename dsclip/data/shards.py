"""``dsclip shards``: write WebDataset shards (+ ``sizes.json``) from images with captions.

Captions come from a CSV/TSV or JSONL manifest, or from ``.txt`` files next to the images.
``OUT`` is a local folder or an ``s3://bucket/prefix``; S3 output streams straight to the
bucket (multipart upload), never through a local copy.  ``write_shards`` is the library face
used by the demo and the tests to shard in-memory ``(key, image, caption)`` tuples.

Each sample is ``KEY.jpg`` (or ``.png``/``.webp`` when the source bytes are kept), ``KEY.txt``
and ``KEY.json`` (caption plus any metadata), with fixed tar metadata so the same input gives
byte-identical shards.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

from PIL import Image

from ..config import ConfigError
from .s3 import s3_endpoint, s3_filesystem, safe_url

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_IMAGE_KEYS = ("filepath", "image", "image_path", "file", "filename", "path", "url")
_CAPTION_KEYS = ("title", "caption", "text", "txt")


@dataclass
class ShardSummary:
    shards: list[str] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self, out: str) -> str:
        skipped = sum(self.skipped.values())
        detail = f" (skipped {skipped}: " + ", ".join(f"{k} {v}" for k, v in self.skipped.items()) + ")" \
            if skipped else ""
        return (f"wrote {self.samples} samples in {len(self.shards)} shards to {safe_url(out)}{detail} "
                f"in {self.seconds:.1f}s")


def safe_key(key: str) -> str:
    """A tar-safe sample key: no dots (they start the extension), slashes or odd characters."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key) or "_"


def encode_image(image: Image.Image | bytes, resize: int | None, quality: int = 95) -> tuple[bytes, str]:
    """(bytes, extension).  Source bytes in JPEG/PNG/WebP are kept as they are unless resizing."""
    if isinstance(image, (bytes, bytearray)):
        if resize is None:
            with Image.open(io.BytesIO(image)) as im:
                ext = _KEPT_FORMATS.get(im.format or "")
                if ext is not None:
                    im.verify()
                    return bytes(image), ext
        image = Image.open(io.BytesIO(image))
        image.load()
    im = image.convert("RGB")
    if resize is not None and min(im.size) > resize:
        w, h = im.size
        scale = resize / min(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg"


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "dsclip", "dsclip"
    tf.addfile(info, io.BytesIO(data))


class _ShardFile:
    """A destination for one shard: a temp file renamed into place, or an S3 upload."""

    def __init__(self, url: str, endpoint: str | None):
        self.url = url
        if url.startswith("s3://"):
            self._fh: IO[bytes] = s3_filesystem(endpoint).open(url[len("s3://"):], "wb")
            self._tmp = None
        else:
            self._tmp = f"{url}.tmp{os.getpid()}"
            self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed (and renamed) in close()

    def write(self, data: bytes) -> int:
        return self._fh.write(data)

    def close(self) -> None:
        self._fh.close()
        if self._tmp is not None:
            os.replace(self._tmp, self.url)


def _write_text(url: str, text: str, endpoint: str | None) -> None:
    if url.startswith("s3://"):
        with s3_filesystem(endpoint).open(url[len("s3://"):], "wb") as fh:
            fh.write(text.encode())
        return
    tmp = f"{url}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, url)


def _shard_url(out: str, index: int) -> str:
    if "%" in out:
        return out % index
    if "{" in out:
        return out.format(index)
    return f"{out.rstrip('/')}/shard-{index:06d}.tar"


def write_shards(samples: Iterable[tuple], out: str, samples_per_shard: int, *, resize: int | None = None,
                 quality: int = 95, endpoint: str | None = None, progress: bool = False,
                 total: int | None = None) -> ShardSummary:
    """Write ``(key, PIL image or encoded bytes, caption[, metadata dict])`` tuples as shards.

    ``out`` is a folder or ``s3://`` prefix (shards ``shard-000000.tar``, ...), or a pattern with
    ``%06d`` / ``{:06d}``.  ``sizes.json`` (shard basename -> samples) goes next to the shards.
    Images that cannot be read are skipped and counted in the summary.
    """
    if samples_per_shard < 1:
        raise ConfigError("--samples-per-shard must be at least 1")
    endpoint = s3_endpoint(endpoint)
    folder = os.path.dirname(_shard_url(out, 0))
    if not folder.startswith("s3://"):
        os.makedirs(folder or ".", exist_ok=True)
    summary = ShardSummary()
    start = time.time()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="shards", file=sys.stderr)
    dest: _ShardFile | None = None
    tf: tarfile.TarFile | None = None
    count = 0

    def finish() -> None:
        nonlocal dest, tf
        if tf is not None:
            tf.close()
            dest.close()
            summary.sizes[os.path.basename(dest.url)] = count
            tf = dest = None

    try:
        for item in samples:
            key, image, caption = item[0], item[1], item[2]
            meta = dict(item[3]) if len(item) > 3 and item[3] else {}
            if bar is not None:
                bar.update(1)
            caption = (caption or "").strip()
            if not caption:
                summary.skipped["no_caption"] = summary.skipped.get("no_caption", 0) + 1
                continue
            try:
                data, ext = encode_image(image, resize, quality)
            except Exception:  # noqa: BLE001 - any unreadable image is skipped and counted
                summary.skipped["bad_image"] = summary.skipped.get("bad_image", 0) + 1
                continue
            if tf is None or count >= samples_per_shard:
                finish()
                dest = _ShardFile(_shard_url(out, len(summary.shards)), endpoint)
                summary.shards.append(dest.url)
                tf = tarfile.open(fileobj=dest, mode="w|", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
                count = 0
            k = safe_key(str(key))
            _add(tf, f"{k}.{ext}", data)
            _add(tf, f"{k}.txt", caption.encode("utf-8"))
            _add(tf, f"{k}.json", json.dumps({"caption": caption, "key": str(key), **meta}).encode("utf-8"))
            count += 1
            summary.samples += 1
        finish()
    finally:
        if bar is not None:
            bar.close()
    sizes_url = f"{folder}/sizes.json" if folder else "sizes.json"
    _write_text(sizes_url, json.dumps(summary.sizes, indent=1, sort_keys=True), endpoint)
    summary.seconds = time.time() - start
    return summary


# ---------------------------------------------------------------- reading an image folder


def _column(header: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: str) -> str:
    if wanted:
        if wanted not in header:
            raise ConfigError(f"{path} has no column '{wanted}' (columns: {', '.join(header)}); fix --{what}")
        return wanted
    for c in candidates:
        if c in header:
            return c
    raise ConfigError(f"{path}: cannot tell which column holds the {what.split('-')[1]} (columns: "
                      f"{', '.join(header)}); pass --{what}")


def manifest_rows(path: str, img_key: str | None = None, caption_key: str | None = None,
                  separator: str | None = None) -> Iterator[tuple[str, str, dict]]:
    """(image path as written, caption, extra fields) from a CSV/TSV or JSONL manifest."""
    if not os.path.isfile(path):
        raise ConfigError(f"manifest not found: {path}; pass an existing .csv/.tsv/.jsonl file")
    if path.endswith((".jsonl", ".json")):
        with open(path) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        if not rows:
            return
        header = sorted(set().union(*rows))
        ik = _column(header, img_key, _IMAGE_KEYS, "csv-img-key", path)
        ck = _column(header, caption_key, _CAPTION_KEYS, "csv-caption-key", path)
        for row in rows:
            yield str(row.get(ik, "")), str(row.get(ck) or ""), {k: v for k, v in row.items() if k not in (ik, ck)}
        return
    sep = separator or ("\t" if path.endswith(".tsv") else ",")
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter=sep)
        header = reader.fieldnames or []
        ik = _column(header, img_key, _IMAGE_KEYS, "csv-img-key", path)
        ck = _column(header, caption_key, _CAPTION_KEYS, "csv-caption-key", path)
        for row in reader:
            yield row[ik] or "", row[ck] or "", {}


def folder_samples(src: str, manifest: str | None = None, img_key: str | None = None,
                   caption_key: str | None = None, separator: str | None = None) -> list[tuple[str, str, str, dict]]:
    """(key, image path, caption, metadata) for every image, in a stable order."""
    if not os.path.isdir(src):
        raise ConfigError(f"source folder not found: {src}; pass a folder of images")
    out = []
    if manifest:
        base = os.path.dirname(os.path.abspath(manifest))
        for i, (rel, caption, extra) in enumerate(manifest_rows(manifest, img_key, caption_key, separator)):
            path = rel if os.path.isabs(rel) else (
                os.path.join(src, rel) if os.path.exists(os.path.join(src, rel)) else os.path.join(base, rel))
            out.append((f"{i:09d}", path, caption, {"source": rel, **extra}))
        return out
    images = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        images += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_SUFFIXES)]
    for i, path in enumerate(images):
        txt = os.path.splitext(path)[0] + ".txt"
        caption = ""
        if os.path.isfile(txt):
            with open(txt, encoding="utf-8") as fh:
                caption = fh.read()
        out.append((f"{i:09d}", path, caption, {"source": os.path.relpath(path, src)}))
    return out


def _load(item: tuple[str, str, str, dict]) -> tuple[str, bytes | None, str, dict]:
    key, path, caption, meta = item
    try:
        with open(path, "rb") as fh:
            return key, fh.read(), caption, meta
    except OSError:
        return key, None, caption, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsclip shards", description="Write WebDataset shards and sizes.json from "
                                "an image folder with captions (manifest or sidecar .txt files).")
    p.add_argument("src", help="folder of images")
    p.add_argument("out", help="output folder or s3://bucket/prefix")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar (default: 1000)")
    p.add_argument("--resize", type=int, default=None, metavar="S",
                   help="downscale so the shorter side is S pixels (re-encodes as JPEG)")
    p.add_argument("--manifest", default=None, help="captions.csv/.tsv/.jsonl with image path and caption "
                   "(default: a .txt next to each image)")
    p.add_argument("--csv-img-key", default=None, help="manifest column with the image path (default: guessed)")
    p.add_argument("--csv-caption-key", default=None, help="manifest column with the caption (default: guessed)")
    p.add_argument("--csv-separator", default=None, help="manifest separator (default: ',' or tab for .tsv)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding (default: 95)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"dsclip: error: {e}", file=sys.stderr, flush=True)
        return 2


def _run(args: argparse.Namespace) -> int:
    items = folder_samples(args.src, args.manifest, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    if not items:
        raise ConfigError(f"no images found in {args.src}; expected .jpg/.png/.webp files")
    missing = 0

    def samples() -> Iterator[tuple]:
        nonlocal missing
        for key, data, caption, meta in map(_load, items):
            if data is None:
                missing += 1
                continue
            yield key, data, caption, meta

    summary = write_shards(samples(), args.out, args.samples_per_shard, resize=args.resize, quality=args.quality,
                           endpoint=args.s3_endpoint_url, progress=not args.no_progress, total=len(items))
    if missing:
        summary.skipped["missing_file"] = missing
    print(summary.line(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
