"""WebDataset shards (s3://, http(s)://, local, pipe:) as a resumable, rank-balanced source.

Per rank and epoch the pipeline is

  shards --(seed+epoch shuffle, split over ranks, then over workers)--> tar members in memory
  --> raw samples --(cheap checks: caption present, image header parses, pixel limit)-->
  seeded shuffle buffer of raw bytes --> skip --> decode + preprocess + tokenize --> batches

Everything up to "skip" works on raw bytes, so ``batches(epoch, k)`` reaches batch ``k`` without
decoding the batches before it and yields exactly what ``batches(epoch, 0)`` yields from ``k``
on.  Augmentation is seeded per batch too, so even the random crops match.

Balance policy.  ``num_batches = num_samples // (batch_size * world)`` on every rank.  Each
rank has ``workers`` logical streams; batch ``n`` of a rank comes from stream ``n % workers``
(DataLoader hands out batches round-robin and keeps their order).  A stream whose shards hold
fewer samples than its quota wraps around and reads them again (those samples repeat within
the epoch); a stream with more drops its tail.  When there are fewer shards than streams, a
shard is shared and each sharer keeps every k-th sample, so no stream is empty.  With
``--dataset-resampled`` each stream draws shards with replacement from its own seeded random
generator (seed, epoch, rank, stream) and mixes ``::``-joined sources sample by sample.

Exact resume needs the same world size, workers, batch size and seed.  Unusable samples
(corrupt tar, bad image, missing or empty caption) are skipped and counted per kind and shard;
the counts ride on each batch and are merged into ``stats()``.  An image whose header parses
but whose pixels do not decode is replaced by another sample of the same batch, so batch
positions, and thus resume, stay exact.  Tar members are only ever read into memory, by
a small sequential tar reader (``tar_members``); member names with ``..`` or an absolute path
are skipped and counted.  Remote shards are read ahead on a thread and the next shard is
opened while the current one is decoded, so storage latency hides behind decoding.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import itertools
import logging
import os
import random
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..config import Config, ConfigError
from .s3 import DEFAULT_BLOCK_SIZE, ShardReadError, StorageAuthError, open_shard, s3_endpoint, safe_url
from .urls import ShardSet, mixing_weights, resolve_sources

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
MIN_SAMPLES_FOR_SKIP_CHECK = 100
MAX_MEMBER_BYTES = 256 << 20


class DataError(RuntimeError):
    """The data cannot feed training: too many unreadable samples, or a stream with none."""


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts; unlike ``hash()`` it is the same in every process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ---------------------------------------------------------------- skip counters


class SkipCounter:
    """Samples seen and skipped (by kind and shard) in one process; cumulative."""

    def __init__(self) -> None:
        self.samples = 0
        self.retries = 0
        self.skipped: dict[str, dict[str, int]] = {}

    def skip(self, kind: str, shard: str, n: int = 1) -> None:
        per_shard = self.skipped.setdefault(kind, {})
        per_shard[shard] = per_shard.get(shard, 0) + n

    def snapshot(self) -> dict[str, Any]:
        return {"samples": self.samples, "retries": self.retries,
                "skipped": {k: dict(v) for k, v in self.skipped.items()}}


class StatsBook:
    """Merges the cumulative snapshots that workers attach to their batches."""

    def __init__(self) -> None:
        self._base: list[dict] = []
        self._latest: dict[Any, dict] = {}

    def record(self, worker: Any, snapshot: dict) -> None:
        self._latest[worker] = snapshot

    def fold(self) -> None:
        """Keep what finished (non-persistent) workers counted before new ones start from zero."""
        self._base.extend(self._latest.values())
        self._latest = {}

    def summary(self) -> dict[str, Any]:
        samples = retries = 0
        by_shard: dict[str, dict[str, int]] = {}
        by_kind: dict[str, int] = {}
        for snap in itertools.chain(self._base, self._latest.values()):
            samples += snap["samples"]
            retries += snap["retries"]
            for kind, shards in snap["skipped"].items():
                for shard, n in shards.items():
                    by_kind[kind] = by_kind.get(kind, 0) + n
                    row = by_shard.setdefault(shard, {})
                    row[kind] = row.get(kind, 0) + n
        skipped = sum(by_kind.values())
        return {"samples": samples, "skipped": skipped, "skip_fraction": skipped / max(samples, 1),
                "retries": retries, "by_kind": by_kind, "by_shard": by_shard}

    def check(self, max_fraction: float) -> dict[str, Any]:
        s = self.summary()
        if s["samples"] >= MIN_SAMPLES_FOR_SKIP_CHECK and s["skip_fraction"] > max_fraction:
            worst = sorted(s["by_shard"].items(), key=lambda kv: -sum(kv[1].values()))[:3]
            names = "; ".join(f"{shard} ({', '.join(f'{k} {n}' for k, n in kinds.items())})"
                              for shard, kinds in worst)
            raise DataError(f"{s['skipped']} of {s['samples']} samples ({s['skip_fraction']:.1%}) were unusable, "
                            f"above --max-skip-fraction {max_fraction}; worst shards: {names}; fix or drop "
                            f"those shards, or raise --max-skip-fraction")
        return s


# ---------------------------------------------------------------- tar -> raw samples


def _member_key(name: str) -> tuple[str, str] | None:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); the extension starts at the first dot."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _unsafe(name: str) -> bool:
    return name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or ":" in name[:3]


class CorruptTar(ValueError):
    """The bytes are not a (complete) tar archive."""


def _read_exact(stream: Any, n: int) -> bytes:
    data = stream.read(n) if n else b""
    if len(data) != n:  # buffered streams return short reads only at the end
        raise CorruptTar(f"unexpected end of data ({len(data)} of {n} bytes)")
    return data


def _skip(stream: Any, n: int) -> None:
    while n > 0:
        n -= len(_read_exact(stream, min(n, 1 << 20)))


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise CorruptTar(f"bad number field {field[:12]!r}") from None


def _maybe_gunzip(stream: Any) -> Any:
    if hasattr(stream, "peek"):
        magic = stream.peek(2)[:2]
    elif stream.seekable():
        pos = stream.tell()
        magic = stream.read(2)
        stream.seek(pos)
    else:
        return stream
    return gzip.GzipFile(fileobj=stream) if magic == b"\x1f\x8b" else stream


def tar_members(stream: Any) -> Iterator[tuple[str, bytes | None]]:
    """(name, data) of the regular files of a tar stream, read sequentially into memory.

    ``data`` is None for a member over ``MAX_MEMBER_BYTES`` (skipped unread).  Handles ustar
    prefixes, GNU long names and pax ``path``/``size``; raises ``CorruptTar`` on a bad header
    checksum or an archive that ends without its zero block.  Nothing is written to disk.
    """
    stream = _maybe_gunzip(stream)
    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        header = stream.read(512)
        if len(header) < 512:
            raise CorruptTar("archive truncated (no end-of-archive block)")
        if header == _ZERO_BLOCK:
            return
        if _number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise CorruptTar("bad header checksum")
        kind = header[156:157]
        size = int(pax.get(b"size", b"0")) if b"size" in pax else _number(header[124:136])
        padding = -size % 512
        if kind in (b"L", b"x", b"g"):
            body = _read_exact(stream, size)
            _skip(stream, padding)
            if kind == b"L":
                long_name = body.split(b"\0", 1)[0]
            elif kind == b"x":
                pax = _pax_records(body)
            continue
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345:346] != b"\0":
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        name = pax.get(b"path") or long_name or name
        long_name, pax = None, {}
        if kind not in (b"0", b"\0", b"7"):  # directories, links, devices: nothing to read
            _skip(stream, size + padding)
            continue
        if size > MAX_MEMBER_BYTES:
            _skip(stream, size + padding)
            yield name.decode("utf-8", "replace"), None
            continue
        data = _read_exact(stream, size)
        _skip(stream, padding)
        yield name.decode("utf-8", "replace"), data


_ZERO_BLOCK = bytes(512)


def _pax_records(body: bytes) -> dict[bytes, bytes]:
    out, pos = {}, 0
    while pos < len(body):
        length_text, _, _ = body[pos: pos + 20].partition(b" ")
        try:
            length = int(length_text)
        except ValueError:
            raise CorruptTar("bad pax header") from None
        record = body[pos: pos + length]
        key, _, value = record[len(length_text) + 1:].rstrip(b"\n").partition(b"=")
        out[key] = value
        pos += max(length, 1)
    return out


def iter_tar(stream: Any, shard: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """Group the members of a tar stream into samples (dicts ext -> bytes, plus ``__key__``).

    Stops at the first error; the sample being assembled then is dropped and the shard is
    counted as ``corrupt_tar`` (bad archive) or ``shard_failed`` (storage gave up).  Refused
    credentials are a ``DataError``: no other shard would read either.
    """
    current: dict[str, Any] = {}
    try:
        for name, data in tar_members(stream):
            if _unsafe(name):
                counter.skip("unsafe_member", shard)
                continue
            parsed = _member_key(name)
            if parsed is None:
                continue
            if data is None:
                counter.skip("too_large", shard)
                continue
            key, ext = parsed
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext] = data
    except StorageAuthError as e:
        raise DataError(str(e)) from None
    except ShardReadError as e:
        counter.skip("shard_failed", shard)
        log.warning("skipping the rest of shard %s: %s", shard, e)
        return
    except (CorruptTar, EOFError, OSError, zlib.error) as e:
        counter.skip("corrupt_tar", shard)
        log.warning("skipping the rest of shard %s: corrupt tar (%s)", shard, e)
        return
    if current:
        yield current


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


def decode_image(data: bytes, preprocess: Callable, max_pixels: int) -> torch.Tensor:
    with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
        if im.size[0] * im.size[1] > max_pixels:
            raise ValueError("image over --max-image-pixels")
        return preprocess(im.convert("RGB"))


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


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """A seeded shuffle buffer: fill ``size`` items, then emit a random one per new item."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


# ---------------------------------------------------------------- shard assignment


@dataclass(frozen=True)
class ShardPart:
    """Raw samples ``i`` of ``shard`` with ``i % count == index``."""

    shard: str
    index: int = 0
    count: int = 1


def split_parts(parts: list[ShardPart], consumers: int, which: int) -> list[ShardPart]:
    """Consumer ``which``'s share: whole parts when there are enough, else a stride of one."""
    n = len(parts)
    if n >= consumers:
        return parts[which::consumers]
    part = parts[which % n]
    sharers = len(range(which % n, consumers, n))
    return [ShardPart(part.shard, part.index + part.count * (which // n), part.count * sharers)]


def shard_names(urls: list[str]) -> dict[str, str]:
    """Short, unique, stable names for keys and stats: the basename, or more path if needed."""
    for depth in (1, 2, 3):
        names = {u: "/".join(u.rstrip("/").split("/")[-depth:]) for u in urls}
        if len(set(names.values())) == len(set(urls)):
            return names
    return {u: safe_url(u) for u in urls}


# ---------------------------------------------------------------- the per-stream pipeline


class CountingPipeline:
    """Base of the per-worker pipelines: a skip counter that starts fresh in each process."""

    _counter: SkipCounter | None = None
    _pid = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_counter"], state["_pid"] = None, -1
        return state

    @property
    def counter(self) -> SkipCounter:
        if self._pid != os.getpid():
            self._counter, self._pid = SkipCounter(), os.getpid()
        return self._counter


class ShardPipeline(CountingPipeline):
    """Everything a worker needs to produce its batches; small and picklable."""

    def __init__(self, sources: list[ShardSet], weights: list[float], *, rank: int, world: int, batch_size: int,
                 num_batches: int, seed: int, shuffle: bool, resampled: bool, buffer: int, preprocess: Callable,
                 tokenizer: Callable, max_pixels: int, retries: int, endpoint: str | None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        self.sources, self.weights = sources, weights
        self.rank, self.world, self.batch_size, self.num_batches = rank, world, batch_size, num_batches
        self.seed, self.shuffle, self.resampled, self.buffer = seed, shuffle, resampled, buffer
        self.preprocess, self.tokenizer, self.max_pixels = preprocess, tokenizer, max_pixels
        self.retries, self.endpoint, self.block_size = retries, endpoint, block_size
        self.names = shard_names([s for src in sources for s in src.shards])

    # -- raw samples

    def _on_retry(self, url: str, offset: int, exc: BaseException) -> None:
        self.counter.retries += 1
        log.warning("retrying %s at byte %d after %s", safe_url(url), offset, type(exc).__name__)

    def _open(self, part: ShardPart) -> Any:
        """The shard's byte stream (remote ones start reading ahead now), or None if it cannot open."""
        try:
            return open_shard(part.shard, self.retries, self.endpoint, self.block_size, self._on_retry)
        except StorageAuthError as e:
            raise DataError(str(e)) from None
        except OSError as e:
            self.counter.skip("shard_failed", self.names[part.shard])
            log.warning("cannot open shard %s: %s", self.names[part.shard], e)
            return None

    def _shard_samples(self, part: ShardPart, stream: Any = None) -> Iterator[tuple[str, str, bytes, str]]:
        """Usable (key, shard, image bytes, caption) of one shard part; the rest is counted."""
        name = self.names[part.shard]
        counter = self.counter
        stream = stream or self._open(part)
        if stream is None:
            return
        with stream:
            for i, sample in enumerate(iter_tar(stream, name, counter)):
                if i % part.count != part.index:
                    continue
                counter.samples += 1
                ext = next((e for e in IMAGE_EXTS if e in sample), None)
                if ext is None:
                    counter.skip("missing_image", name)
                    continue
                caption, why = caption_of(sample)
                if why is None:
                    why = check_image_header(sample[ext], self.max_pixels)
                if why is not None:
                    counter.skip(why, name)
                    continue
                yield f"{name}/{sample['__key__']}", name, sample[ext], caption

    def _prefetched(self, parts: list[ShardPart]) -> Iterator[tuple[str, str, bytes, str]]:
        """Samples of ``parts`` in order, with the next shard opened (reading ahead) while the
        current one is consumed, so remote latency hides behind decoding."""
        upcoming = self._open(parts[0]) if parts else None
        try:
            for i, part in enumerate(parts):
                stream, upcoming = upcoming, None
                if i + 1 < len(parts):
                    upcoming = self._open(parts[i + 1])
                if stream is not None:
                    yield from self._shard_samples(part, stream)
        finally:
            if upcoming is not None:
                upcoming.close()

    def _passes(self, epoch: int, stream: int, streams: int) -> Iterator[Iterator[tuple[str, str, bytes, str]]]:
        """Passes over this stream's share of the shards; more than one when it wraps around."""
        shards = [s for src in self.sources for s in src.shards]
        if self.shuffle:
            random.Random(stable_seed(self.seed, epoch, "shards")).shuffle(shards)
        parts = split_parts([ShardPart(s) for s in shards], self.world, self.rank)
        parts = split_parts(parts, streams, stream)

        def one_pass(got: list[int]) -> Iterator[tuple[str, str, bytes, str]]:
            for sample in self._prefetched(parts):
                got[0] += 1
                yield sample

        for _ in itertools.count():
            got = [0]
            yield one_pass(got)
            if got[0] == 0:
                raise DataError(f"rank {self.rank} stream {stream} has no usable sample in its shards "
                                f"({', '.join(self.names[p.shard] for p in parts[:3])}...); check the data")

    def _resampled(self, epoch: int, stream: int) -> Iterator[tuple[str, str, bytes, str]]:
        mix = random.Random(stable_seed(self.seed, epoch, self.rank, stream, "mix"))
        draw = [random.Random(stable_seed(self.seed, epoch, self.rank, stream, "draw", i))
                for i in range(len(self.sources))]
        current: list[Iterator | None] = [None] * len(self.sources)
        upcoming: list[tuple[ShardPart, Any] | None] = [None] * len(self.sources)
        empty = [0] * len(self.sources)
        cumulative = list(itertools.accumulate(self.weights))

        def next_shard(s: int) -> Iterator:
            # the following draw is opened now so that it reads ahead; the draw order is unchanged
            part, opened = upcoming[s] or self._drawn(draw[s], s)
            upcoming[s] = self._drawn(draw[s], s)
            return self._shard_samples(part, opened) if opened is not None else iter(())

        try:
            while True:
                s = min(bisect.bisect_right(cumulative, mix.random()), len(self.sources) - 1)
                while True:
                    if current[s] is None:
                        current[s] = next_shard(s)
                    sample = next(current[s], None)
                    if sample is not None:
                        empty[s] = 0
                        yield sample
                        break
                    current[s] = None
                    empty[s] += 1
                    if empty[s] > 100:
                        raise DataError(f"100 shards drawn in a row from {safe_url(self.sources[s].url)} had "
                                        f"no usable sample; check the data")
        finally:
            for item in upcoming:
                if item is not None and item[1] is not None:
                    item[1].close()

    def _drawn(self, rng: random.Random, s: int) -> tuple[ShardPart, Any]:
        part = ShardPart(rng.choice(self.sources[s].shards))
        return part, self._open(part)

    # -- batches

    def stream_batches(self, epoch: int, start_batch: int, stream: int, streams: int) -> Iterator[dict]:
        """Batches ``n = stream, stream + streams, ...`` (``n >= start_batch``) of this rank's epoch."""
        quota = len(range(stream, self.num_batches, streams))
        skip = len(range(stream, min(start_batch, self.num_batches), streams))
        if self.resampled:
            samples: Iterator = shuffled(self._resampled(epoch, stream), self.buffer,
                                         random.Random(stable_seed(self.seed, epoch, self.rank, stream, "buffer")))
        else:  # shuffle each pass on its own so a wrap-around never overtakes unread samples
            samples = itertools.chain.from_iterable(
                shuffled(one, self.buffer, random.Random(stable_seed(self.seed, epoch, self.rank, stream, n)))
                if self.shuffle else one
                for n, one in enumerate(self._passes(epoch, stream, streams)))
        for _ in itertools.islice(samples, skip * self.batch_size):
            pass
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        for j in range(skip, quota):
            chunk = list(itertools.islice(samples, self.batch_size))
            n = stream + j * streams
            batch = collate(chunk, self.preprocess, self.tokenizer, self.max_pixels,
                            stable_seed(self.seed, epoch, self.rank, n, "augment"), self.counter)
            batch["stats"] = self.counter.snapshot()
            yield batch


class BatchStream(torch.utils.data.IterableDataset):
    """The DataLoader face of a pipeline (anything with ``stream_batches``): (epoch, start_batch)
    arrive through shared memory so that persistent workers see each new ``batches()`` call."""

    def __init__(self, pipeline: Any, state: torch.Tensor):
        super().__init__()
        self.pipeline, self.state = pipeline, state

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, start = (int(v) for v in self.state.tolist())
        # a resumed loader starts its round-robin at worker 0, which must play stream start % workers
        stream = (worker + start) % workers
        for batch in self.pipeline.stream_batches(epoch, start, stream, workers):
            batch["stats"]["worker"] = worker
            yield batch


class BatchLoader:
    """Runs a batch-yielding IterableDataset in DataLoader workers and merges their stats."""

    def __init__(self, dataset_factory: Callable[[torch.Tensor], torch.utils.data.IterableDataset], workers: int,
                 persistent: bool, max_skip_fraction: float, multiprocessing_context: Any = None):
        self.workers, self.persistent, self.max_skip_fraction = workers, persistent, max_skip_fraction
        self.state = torch.zeros(2, dtype=torch.long).share_memory_()
        self.dataset = dataset_factory(self.state)
        self.book = StatsBook()
        self._loader = None
        self._ctx = multiprocessing_context

    def _make_loader(self):
        if self._loader is None or not self.persistent:
            self._loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, num_workers=self.workers, pin_memory=torch.cuda.is_available(),
                persistent_workers=self.persistent, prefetch_factor=2, multiprocessing_context=self._ctx)
            if not self.persistent:
                self.book.fold()
        return self._loader

    def __call__(self, epoch: int, start_batch: int) -> Iterator[dict]:
        self.state[0], self.state[1] = epoch, start_batch
        if self.workers == 0:
            try:
                yield from self._checked(iter(self.dataset))
            finally:  # keep the counts even when the stream fails before its first batch
                self.book.record(0, self.dataset.pipeline.counter.snapshot())
        else:
            yield from self._checked(self._make_loader())

    def _checked(self, batches: Iterable[dict]) -> Iterator[dict]:
        for batch in batches:
            snap = batch["stats"]
            self.book.record(snap.get("worker", 0), snap)
            batch["stats"] = self.book.check(self.max_skip_fraction)
            yield batch


# ---------------------------------------------------------------- the Source


class WebDatasetSource:
    """``--dataset-type webdataset``: see the module docstring for the pipeline and its policies."""

    def __init__(self, cfg: Config, split: str, preprocess: Callable, tokenizer: Callable, rank: int, world: int,
                 batch_size: int, *, block_size: int = DEFAULT_BLOCK_SIZE, multiprocessing_context: Any = None):
        d = cfg.data
        train = split == "train"
        spec = d.train_data if train else d.val_data
        flag = "--train-data" if train else "--val-data"
        if not spec:
            raise ConfigError(f"{flag} is empty; give shard URLs such as s3://bucket/shard-{{000000..000009}}.tar")
        endpoint = s3_endpoint(d.s3_endpoint_url)
        sources = resolve_sources(spec, allow_pipe=d.allow_pipe_urls, endpoint=endpoint)
        resampled = bool(d.dataset_resampled) and train
        weights = mixing_weights(d.train_data_upsampling_factors if train else None, sources, resampled)
        num_samples = d.train_num_samples if train else d.val_num_samples
        if num_samples is None:
            counts = [s.num_samples for s in sources]
            unknown = [s.url for s, c in zip(sources, counts) if c is None]
            if unknown:
                which = "--train-num-samples" if train else "--val-num-samples"
                raise ConfigError(f"cannot tell how many samples {safe_url(unknown[0])} holds (no sizes.json or "
                                  f"__len__ next to its shards); pass {which} N")
            num_samples = sum(counts)
        self.num_samples = int(num_samples)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.num_batches = self.num_samples // (batch_size * world)
        if self.num_batches == 0:
            raise ConfigError(f"{self.num_samples} samples in {flag} cannot fill one global batch of "
                              f"{batch_size * world}; lower --batch-size or add data")
        self.sources = sources
        self.pipeline = ShardPipeline(
            sources, weights, rank=rank, world=world, batch_size=batch_size, num_batches=self.num_batches,
            seed=cfg.run.seed + (0 if train else 7919), shuffle=train, resampled=resampled,
            buffer=max(1, d.shuffle_buffer), preprocess=preprocess, tokenizer=tokenizer,
            max_pixels=d.max_image_pixels, retries=d.shard_retries, endpoint=endpoint, block_size=block_size)
        self._loader = BatchLoader(lambda state: BatchStream(self.pipeline, state), max(0, d.workers),
                                   persistent=train, max_skip_fraction=d.max_skip_fraction,
                                   multiprocessing_context=multiprocessing_context)

    @property
    def num_shards(self) -> int:
        return sum(len(s.shards) for s in self.sources)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        if start_batch >= self.num_batches:
            return iter(())
        return self._loader(epoch, start_batch)

    def stats(self) -> dict[str, Any]:
        return self._loader.book.summary()
