"""Raw WebDataset samples to training tensors: captions, cheap image-header checks (pixel
limit), decoding and preprocessing, and batches whose positions never shift."""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ..config import ConfigError
from .skips import DataError, SkipCounter

log = logging.getLogger(__name__)

PIL_FORMATS = ("JPEG", "PNG", "WEBP")


def caption_of(sample: dict[str, Any]) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip kind), from ``txt`` or ``json["caption"]``."""
    try:
        if "txt" in sample:
            text = sample["txt"].decode("utf-8")
        elif "json" in sample:
            import json

            meta = json.loads(sample["json"])
            text = meta.get("caption") if isinstance(meta, dict) else None
            if text is None:
                return None, "missing_caption"
            if not isinstance(text, str):
                return None, "bad_caption"
        else:
            return None, "missing_caption"
    except (UnicodeDecodeError, ValueError):
        return None, "bad_caption"
    text = text.strip()
    return (text, None) if text else (None, "empty_caption")


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG, PNG or WebP header without PIL, or None if not recognised."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        if data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 <= len(data):
                if data[i] != 0xFF:
                    return None
                marker = data[i + 1]
                if marker == 0xFF:  # fill byte
                    i += 1
                elif marker in _JPEG_SOF:
                    h, w = struct.unpack(">HH", data[i + 5: i + 9])
                    return w, h
                elif marker == 0x01 or 0xD0 <= marker <= 0xD8:
                    i += 2
                else:
                    i += 2 + struct.unpack(">H", data[i + 2: i + 4])[0]
            return None
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            chunk = data[12:16]
            if chunk == b"VP8 ":
                w, h = struct.unpack("<HH", data[26:30])
                return w & 0x3FFF, h & 0x3FFF
            if chunk == b"VP8L":
                bits = int.from_bytes(data[21:25], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if chunk == b"VP8X":
                return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    except struct.error:
        return None
    return None


def check_image_header(data: bytes, max_pixels: int) -> str | None:
    """None if the image header parses and is within the pixel limit, else the skip kind.

    Only the header is read (a fast parser, then PIL's for anything it does not recognise),
    so this runs for skipped samples too and keeps resume exact."""
    size = image_size(data)
    if size is None:
        try:
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                size = im.size
        except Image.DecompressionBombError:
            return "too_large"
        except Exception:  # noqa: BLE001 - PIL raises many kinds for garbage
            return "bad_image"
    w, h = size
    if w <= 0 or h <= 0:
        return "bad_image"
    return "too_large" if w * h > max_pixels else None


def batches_per_rank(num_samples: int, batch_size: int, world: int, what: str, fix: str) -> int:
    """Full global batches in an epoch of ``num_samples``; ConfigError ("``what`` cannot fill one
    global batch of N; ``fix``") when there is none."""
    n = num_samples // (batch_size * world)
    if n == 0:
        raise ConfigError(f"{what} cannot fill one global batch of {batch_size * world}; {fix}")
    return n


def open_rgb(src: Any, what: str, max_pixels: int, formats: tuple[str, ...] | None = None) -> Image.Image:
    """An RGB PIL image, refused from its header alone when over ``max_pixels`` (a decompression
    bomb would otherwise be decoded in full).  Raises ValueError naming ``what``."""
    with Image.open(src, formats=formats) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"{what}: {w}x{h} pixels is over --max-image-pixels {max_pixels}; remove the "
                             f"image or raise the limit")
        return im.convert("RGB")


def decode_image(data: bytes, preprocess: Callable, max_pixels: int) -> torch.Tensor:
    return preprocess(open_rgb(io.BytesIO(data), "image", max_pixels, PIL_FORMATS))


def collate(samples: list[tuple[str, str, bytes, str]], preprocess: Callable, tokenizer: Callable,
            max_pixels: int, aug_seed: int, counter: SkipCounter) -> dict:
    """Decode a batch of (key, shard, image bytes, caption).  A sample whose image fails to decode
    (or that has no image or caption) is replaced by another sample of the batch, and counted,
    so batch positions never shift."""
    images: list[torch.Tensor | None] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(aug_seed)
        for key, shard, data, caption in samples:
            if not caption or data is None:
                counter.skip("empty_caption" if not caption else "missing_image", shard)
                images.append(None)
                continue
            try:
                images.append(decode_image(data, preprocess, max_pixels))
            except Exception as e:  # noqa: BLE001 - any decode failure skips the sample
                counter.skip("bad_image", shard)
                log.debug("undecodable image %s: %s", key, e)
                images.append(None)
    good = [i for i, im in enumerate(images) if im is not None]
    if not good:
        raise DataError(f"no image of the batch starting at {samples[0][0]} decodes; check those shards")
    keys = [s[0] for s in samples]
    captions = [s[3] for s in samples]
    for n, i in enumerate(i for i, im in enumerate(images) if im is None):
        donor = good[n % len(good)]
        images[i], keys[i], captions[i] = images[donor], keys[donor], captions[donor]
    return {"image": torch.stack(images), "text": tokenizer(captions), "keys": keys, "captions": captions}
