"""WebDataset shards (s3://, http(s)://, local, pipe:) as a resumable, rank-balanced source.

Per rank and epoch the pipeline is

  shards --(seed+epoch shuffle, split over ranks, then over worker streams)--> tar members in
  memory --> raw samples --(cheap checks: caption present, image header parses, pixel limit)-->
  seeded shuffle buffer of raw bytes --> decode + preprocess + tokenize --> batches

Balance policy.  ``num_batches = num_samples // (batch_size * world)`` on every rank.  Each
rank has ``workers`` logical streams; batch ``n`` of a rank comes from stream ``n % workers``
(DataLoader hands out batches round-robin and keeps their order).  When every shard's sample
count is known (``sizes.json``, or ``__len__`` beside a lone shard), the epoch's shuffled-shard
concatenation is cut at sample granularity: each stream reads one contiguous range, its quota
plus an even share of the spare samples (read only to replace unusable ones), so no sample is
read twice in an epoch and only the spare remainder is left out.  Without counts, shards are
dealt out whole, and when there are fewer shards than streams a shard is shared, each sharer
keeping every k-th sample.  Either way, a stream that runs out of usable samples before its
quota wraps around and reads its share again (those samples repeat; counted as ``repeated``).
With ``--dataset-resampled`` each stream draws shards with replacement from its own seeded
random generator (seed, epoch, rank, stream) and mixes ``::``-joined sources sample by sample.

Resume.  Every batch carries its stream's reader state right after the batch was formed
(``StreamReader.position``): the shuffle buffer as references (part or shard, raw sample
index), the next raw sample, the pass, the RNG states and, resampled, the current and next
shard of each source.  The trainer keeps the latest per stream in its checkpoints.  A stream
started from one re-reads only the referenced samples and its reading position: parts before
the earliest one referenced are never opened, and the same sample keys follow in the same
order.  Without a saved position (an old checkpoint), ``batches(epoch, k)`` replays the epoch's
raw samples from its start and discards the first ``k`` batches' worth without decoding them.
Augmentation is seeded per batch, so even the random crops match.  Exact resume needs the same
world size, workers, batch size, buffer and seed.

Unusable samples (corrupt tar, bad image, missing or empty caption) are skipped and counted per
kind and shard as they are read, once per epoch (not again in a wrap-around, a replay or a
resume's re-read); the counts ride on each batch, are merged into ``stats()`` and are kept in
checkpoints.  An image whose header parses but
whose pixels do not decode is replaced by another sample of the same batch, so batch
positions, and thus resume, stay exact.  Tar members are only ever read into memory, by a
small sequential tar reader (``tar_members``); member names with ``..`` or an absolute path are
skipped and counted.  Remote shards are read ahead on a thread and the next shard is opened
while the current one is decoded, so storage latency hides behind decoding.
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


COUNTERS = ("samples", "retries", "repeated", "restored_streams", "replayed_batches")


class SkipCounter:
    """What one process's reader did: raw samples read, skips by kind and shard, storage retries,
    samples read again in a wrap-around (``repeated``), and how its streams started mid-epoch
    (``restored_streams`` from a saved position, ``replayed_batches`` re-read without one).
    Cumulative."""

    def __init__(self) -> None:
        self.samples = self.retries = self.repeated = self.restored_streams = self.replayed_batches = 0
        self.skipped: dict[str, dict[str, int]] = {}

    def skip(self, kind: str, shard: str, n: int = 1) -> None:
        per_shard = self.skipped.setdefault(kind, {})
        per_shard[shard] = per_shard.get(shard, 0) + n

    def snapshot(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in COUNTERS}, "skipped": {k: dict(v) for k, v in self.skipped.items()}}


def summarize(snapshots: Iterable[dict]) -> dict[str, Any]:
    """One summary (totals, ``by_kind``, ``by_shard``, ``skip_fraction``) of counter snapshots."""
    totals = dict.fromkeys(COUNTERS, 0)
    by_shard: dict[str, dict[str, int]] = {}
    for snap in snapshots:
        for k in COUNTERS:
            totals[k] += snap.get(k, 0)
        for kind, shards in snap["skipped"].items():
            for shard, n in shards.items():
                row = by_shard.setdefault(shard, {})
                row[kind] = row.get(kind, 0) + n
    by_kind: dict[str, int] = {}
    for kinds in by_shard.values():
        for kind, n in kinds.items():
            by_kind[kind] = by_kind.get(kind, 0) + n
    skipped = sum(by_kind.values())
    return {**totals, "skipped": skipped, "skip_fraction": skipped / max(totals["samples"], 1),
            "by_kind": dict(sorted(by_kind.items())), "by_shard": by_shard}


def merge_summaries(summaries: Iterable[dict]) -> dict[str, Any]:
    """Add up ``summarize`` results, e.g. those of every rank."""
    snaps = [{**{k: s.get(k, 0) for k in COUNTERS},
              "skipped": _by_kind_then_shard(s.get("by_shard", {}))} for s in summaries if s]
    return summarize(snaps)


def _by_kind_then_shard(by_shard: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for shard, kinds in by_shard.items():
        for kind, n in kinds.items():
            out.setdefault(kind, {})[shard] = n
    return out


def worst_shards(summary: dict[str, Any], n: int = 3) -> list[tuple[str, dict[str, int]]]:
    """The ``n`` shards with the most skipped samples, most first: (name, {kind: count})."""
    rows = summary.get("by_shard", {}).items()
    return sorted(rows, key=lambda kv: (-sum(kv[1].values()), kv[0]))[:n]


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

    def add_base(self, snapshot: dict) -> None:
        """Counts from before this process started (a resumed run's checkpoint)."""
        self._base.append(snapshot)

    def merged(self) -> dict[str, Any]:
        """Everything counted so far as one snapshot (what a checkpoint keeps)."""
        s = summarize(itertools.chain(self._base, self._latest.values()))
        return {**{k: s[k] for k in COUNTERS}, "skipped": _by_kind_then_shard(s["by_shard"])}

    def summary(self) -> dict[str, Any]:
        return summarize(itertools.chain(self._base, self._latest.values()))

    def check(self, max_fraction: float) -> dict[str, Any]:
        s = self.summary()
        if s["samples"] >= MIN_SAMPLES_FOR_SKIP_CHECK and s["skip_fraction"] > max_fraction:
            names = "; ".join(f"{shard} ({', '.join(f'{k} {n}' for k, n in kinds.items())})"
                              for shard, kinds in worst_shards(s))
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


# ---------------------------------------------------------------- shard assignment


@dataclass(frozen=True)
class ShardPart:
    """Raw samples ``i`` of ``shard`` with ``start <= i < stop`` and ``i % count == index``
    (``i`` numbers the shard's samples from 0; ``stop`` None is the shard's end)."""

    shard: str
    index: int = 0
    count: int = 1
    start: int = 0
    stop: int | None = None


def split_parts(parts: list[ShardPart], consumers: int, which: int) -> list[ShardPart]:
    """Consumer ``which``'s share: whole parts when there are enough, else a stride of one."""
    n = len(parts)
    if n >= consumers:
        return parts[which::consumers]
    part = parts[which % n]
    sharers = len(range(which % n, consumers, n))
    return [ShardPart(part.shard, part.index + part.count * (which // n), part.count * sharers)]


def stream_quotas(num_batches: int, batch_size: int, world: int, streams: int) -> list[int]:
    """Samples each stream delivers per epoch, streams numbered ``rank * streams + stream``."""
    return [len(range(s, num_batches, streams)) * batch_size for s in range(streams)] * world


def sample_ranges(total: int, quotas: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each stream's range of the epoch's concatenation of ``total`` samples.

    The ranges are contiguous and disjoint; each is its stream's quota plus an even share of
    the spare samples, which the stream reads only to stand in for unusable ones.  Quotas that
    need more than ``total`` run on around the concatenation."""
    spare = max(0, total - sum(quotas))
    out, pos = [], 0
    for t, quota in enumerate(quotas):
        length = quota + spare // len(quotas) + (1 if t < spare % len(quotas) else 0)
        out.append((pos, length))
        pos += length
    return out


def range_parts(shards: list[str], counts: list[int], start: int, length: int) -> list[ShardPart]:
    """The shard parts holding positions ``[start, start + length)`` of the cyclic concatenation
    of ``shards`` (with ``counts`` samples each)."""
    ends = list(itertools.accumulate(counts))
    total = ends[-1]
    parts, pos, left = [], start % total, length
    while left > 0:
        j = bisect.bisect_right(ends, pos)
        lo = pos - (ends[j] - counts[j])
        take = min(counts[j] - lo, left)
        parts.append(ShardPart(shards[j], start=lo, stop=lo + take))
        pos, left = (pos + take) % total, left - take
    return parts


def shard_names(urls: list[str]) -> dict[str, str]:
    """Short, unique, stable names for keys and stats: the basename, or more path if needed."""
    for depth in (1, 2, 3):
        names = {u: "/".join(u.rstrip("/").split("/")[-depth:]) for u in urls}
        if len(set(names.values())) == len(set(urls)):
            return names
    return {u: safe_url(u) for u in urls}


# ---------------------------------------------------------------- stream readers and their positions

Item = tuple[str, str, bytes, str]  # (key, shard name, image bytes, caption)


class _Tally:
    """What ``iter_tar`` counts for a stream: to its counter, or nowhere while re-reading samples
    that were counted before (a resume)."""

    def __init__(self, owner: Any, quiet: bool):
        self.owner, self.quiet = owner, quiet

    def skip(self, kind: str, shard: str, n: int = 1) -> None:
        if not self.quiet:
            self.owner.counter.skip(kind, shard, n)


def _rng_state(state: Any) -> tuple:
    version, internal, gauss = state
    return int(version), tuple(internal), gauss


def _split_at(samples: Iterator[tuple[int, Item]], split: int,
              early: Callable[[int, Item], None]) -> Iterator[tuple[int, Item]]:
    """``samples`` from raw index ``split`` on; the earlier ones go to ``early``.  Reads up to the
    first sample at or past ``split`` right away."""
    for i, item in samples:
        if i < split:
            early(i, item)
            continue
        return itertools.chain([(i, item)], samples)
    return iter(())


class StreamReader:
    """One worker stream's usable samples through its seeded shuffle buffer.

    Between two samples, ``position()`` is the reader's whole state in plain ints and lists: the
    buffer as references to the samples it holds (where each was read), the buffer RNG, and
    what the subclass needs to read on.  A reader built from such a record re-reads only the
    referenced samples and its reading position, then goes on exactly as the original would."""

    ref_width = 2

    def __init__(self, pipe: ShardPipeline, counter: SkipCounter, size: int):
        self.pipe, self.main, self.size = pipe, counter, size
        self.counting = True
        self.pass_n = 0
        self._uncounted = SkipCounter()
        self.buf: list[tuple[tuple[int, ...], Item]] = []
        self.draining = False
        self.rng = random.Random(0)

    @property
    def counter(self) -> SkipCounter:
        """Nowhere while replaying or wrapping around: those samples were counted when first read."""
        return self.main if self.counting and self.pass_n == 0 else self._uncounted

    def __iter__(self) -> StreamReader:
        return self

    def __next__(self) -> Item:
        while True:
            if not self.draining:
                pulled = self._pull()
                if pulled is not None:
                    if self.size == 0:
                        return self._emit(pulled)
                    if len(self.buf) < self.size:
                        self.buf.append(pulled)
                        continue
                    j = self.rng.randrange(len(self.buf))
                    out, self.buf[j] = self.buf[j], pulled
                    return self._emit(out)
                self.rng.shuffle(self.buf)
                self.draining = True
            if self.buf:
                return self._emit(self.buf.pop())
            self._end_of_input()

    def _emit(self, entry: tuple[tuple[int, ...], Item]) -> Item:
        if self.pass_n and self.counting:  # a wrap-around's buffer holds only that pass's samples
            self.main.repeated += 1
        return entry[1]

    def position(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "drain": self.draining,
                "buf": [x for ref, _ in self.buf for x in ref], **self._reading_state()}

    def close(self) -> None:
        pass

    # -- for subclasses

    def _pull(self) -> tuple[tuple[int, ...], Item] | None:
        raise NotImplementedError

    def _end_of_input(self) -> None:
        raise StopIteration

    def _reading_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _ref_part(self, ref: tuple[int, ...]) -> ShardPart:
        raise NotImplementedError

    def _wanted(self, flat: list[int]) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], list[int]]]:
        w = self.ref_width
        refs = [tuple(int(v) for v in flat[n: n + w]) for n in range(0, len(flat), w)]
        slots: dict[tuple[int, ...], list[int]] = {}
        for n, ref in enumerate(refs):
            slots.setdefault(ref, []).append(n)
        return refs, slots

    def _read_refs(self, part: ShardPart, top: int, found: Callable[[int, Item], None]) -> None:
        """Re-read ``part`` up to raw index ``top``, uncounted, handing its usable samples to ``found``."""
        opened = self.pipe.open_part(part, self)
        if opened is None:
            return
        samples = self.pipe.part_samples(part, opened, self, quiet_until=top + 1)
        for i, item in samples:
            found(i, item)
            if i >= top:
                break
        samples.close()

    def _install_buffer(self, refs: list[tuple[int, ...]], filled: list) -> None:
        lost = [ref for ref, f in zip(refs, filled) if f is None]
        for ref in lost:  # e.g. a shard that no longer reads: the stream goes on without them
            self.main.skip("lost_on_resume", self.pipe.names[self._ref_part(ref).shard])
        if lost:
            log.warning("%d buffered samples could not be read again on resume", len(lost))
        self.buf = [f for f in filled if f is not None]


class PassReader(StreamReader):
    """Without ``--dataset-resampled``: the stream's shard parts in order.  A stream that runs out
    of usable samples before its quota starts another pass over its parts (a wrap-around: those
    samples repeat, counted as ``repeated``).  Each pass shuffles on its own, so a wrap-around
    never overtakes unread samples.  Buffer references are (part, raw sample index)."""

    def __init__(self, pipe: ShardPipeline, epoch: int, stream: int, streams: int, counter: SkipCounter,
                 record: dict | None = None):
        super().__init__(pipe, counter, pipe.buffer if pipe.shuffle else 0)
        self.epoch, self.stream = epoch, stream
        self.parts = pipe.stream_parts(epoch, stream, streams)
        self.live: Iterator[tuple[int, int, Item]] = iter(())
        self.got = 0
        self.next_ref = (0, 0)
        if record is None:
            self._start_pass(0)
        else:
            self._restore(record)

    def _pass_rng(self, n: int) -> random.Random:
        return random.Random(stable_seed(self.pipe.seed, self.epoch, self.pipe.rank, self.stream, n))

    def _start_pass(self, n: int) -> None:
        self.pass_n, self.got, self.next_ref = n, 0, (0, 0)
        self.rng, self.buf, self.draining = self._pass_rng(n), [], False
        self.live = self._read_from(0)

    def _end_of_input(self) -> None:
        if self.got == 0:
            names = ", ".join(self.pipe.names[p.shard] for p in self.parts[:3])
            raise DataError(f"rank {self.pipe.rank} stream {self.stream} has no usable sample in its shards "
                            f"({names}...); check the data")
        self._start_pass(self.pass_n + 1)

    def _pull(self) -> tuple[tuple[int, ...], Item] | None:
        got = next(self.live, None)
        if got is None:
            return None
        p, i, item = got
        self.next_ref = (p, i + 1)
        self.got += 1
        return (p, i), item

    def _reading_state(self) -> dict[str, Any]:
        return {"pass": self.pass_n, "got": self.got, "next": list(self.next_ref)}

    def _ref_part(self, ref: tuple[int, ...]) -> ShardPart:
        return self.parts[ref[0]]

    def _open_part(self, p: int, first: int = 0) -> Any:
        """Part ``p`` opened (it starts reading ahead), or None when it has nothing from ``first`` on."""
        if p >= len(self.parts):
            return None
        part = self.parts[p]
        if part.stop is not None and max(first, part.start) >= part.stop:
            return None
        return self.pipe.open_part(part, self)

    def _read_from(self, p0: int, head: Iterable[tuple[int, Item]] | None = None) -> Iterator[tuple[int, int, Item]]:
        """(part, raw index, item) from part ``p0`` on, each part opening while the one before is
        read; ``head`` stands for part ``p0``'s samples when that part is already positioned."""
        upcoming = self._open_part(p0) if head is None else None
        try:
            for p in range(p0, len(self.parts)):
                if p == p0 and head is not None:
                    samples, upcoming = head, self._open_part(p + 1)
                else:
                    stream, upcoming = upcoming, self._open_part(p + 1)
                    samples = () if stream is None else self.pipe.part_samples(self.parts[p], stream, self)
                for i, item in samples:
                    yield p, i, item
        finally:
            if upcoming is not None:
                upcoming.close()

    def _restore(self, rec: dict) -> None:
        self.pass_n, self.got = int(rec["pass"]), int(rec["got"])
        self.rng = self._pass_rng(self.pass_n)
        self.rng.setstate(_rng_state(rec["rng"]))
        self.draining = bool(rec["drain"])
        p_next, i_next = (int(v) for v in rec["next"])
        self.next_ref = (p_next, i_next)
        refs, slots = self._wanted(rec["buf"])
        filled: list = [None] * len(refs)

        def found_in(p: int) -> Callable[[int, Item], None]:
            def found(i: int, item: Item) -> None:
                for n in slots.get((p, i), ()):
                    filled[n] = ((p, i), item)
            return found

        top: dict[int, int] = {}
        for p, i in refs:
            top[p] = max(top.get(p, -1), i)
        live = not self.draining and p_next < len(self.parts)
        for p in sorted(top):  # parts the buffer does not reference are not opened at all
            if not (live and p == p_next):
                self._read_refs(self.parts[p], top[p], found_in(p))
        self.live = iter(())
        if live:  # the part being read: its referenced samples, then on from the next one
            first = 0 if p_next in top else i_next
            stream = self._open_part(p_next, first)
            head: Iterable[tuple[int, Item]] = ()
            if stream is not None:
                samples = self.pipe.part_samples(self.parts[p_next], stream, self, first=first, quiet_until=i_next)
                head = _split_at(samples, i_next, found_in(p_next))
            self.live = self._read_from(p_next, head)
        self._install_buffer(refs, filled)


class ResampledReader(StreamReader):
    """``--dataset-resampled``: each sample's source is drawn by weight (the ``mix`` RNG); each
    source reads shards drawn with replacement (its ``draw`` RNG), the next draw already open
    so that it reads ahead.  Never ends.  Buffer references are (source, shard, raw index)."""

    ref_width = 3

    def __init__(self, pipe: ShardPipeline, epoch: int, stream: int, counter: SkipCounter,
                 record: dict | None = None):
        super().__init__(pipe, counter, pipe.buffer)
        key = (pipe.seed, epoch, pipe.rank, stream)
        n = len(pipe.sources)
        self.rng = random.Random(stable_seed(*key, "buffer"))
        self.mix = random.Random(stable_seed(*key, "mix"))
        self.draw = [random.Random(stable_seed(*key, "draw", s)) for s in range(n)]
        self.cumulative = list(itertools.accumulate(pipe.weights))
        self.current: list[list | None] = [None] * n  # per source: [shard, next raw index, samples]
        self.upcoming: list[tuple[int, Any] | None] = [None] * n  # per source: (shard, opened stream)
        self.empty = [0] * n
        if record is not None:
            self._restore(record)

    def _part(self, s: int, k: int) -> ShardPart:
        return ShardPart(self.pipe.sources[s].shards[k])

    def _ref_part(self, ref: tuple[int, ...]) -> ShardPart:
        return self._part(ref[0], ref[1])

    def _pull(self) -> tuple[tuple[int, ...], Item]:
        s = min(bisect.bisect_right(self.cumulative, self.mix.random()), len(self.current) - 1)
        while True:
            cur = self.current[s]
            if cur is None:
                cur = self.current[s] = self._next_shard(s)
            got = next(cur[2], None)
            if got is not None:
                cur[1] = got[0] + 1
                self.empty[s] = 0
                return (s, cur[0], got[0]), got[1]
            self.current[s] = None
            self.empty[s] += 1
            if self.empty[s] > 100:
                raise DataError(f"100 shards drawn in a row from {safe_url(self.pipe.sources[s].url)} had "
                                f"no usable sample; check the data")

    def _draw(self, s: int) -> tuple[int, Any]:
        k = self.draw[s].randrange(len(self.pipe.sources[s].shards))
        return k, self.pipe.open_part(self._part(s, k), self)

    def _next_shard(self, s: int) -> list:
        # the following draw is opened now so that it reads ahead; the draw order is unchanged
        k, opened = self.upcoming[s] or self._draw(s)
        self.upcoming[s] = self._draw(s)
        return [k, 0, iter(()) if opened is None else self.pipe.part_samples(self._part(s, k), opened, self)]

    def _reading_state(self) -> dict[str, Any]:
        return {"mix": self.mix.getstate(), "draw": [d.getstate() for d in self.draw],
                "cur": [None if c is None else [c[0], c[1]] for c in self.current],
                "up": [None if u is None else u[0] for u in self.upcoming], "empty": list(self.empty)}

    def close(self) -> None:
        for item in self.upcoming:
            if item is not None and item[1] is not None:
                item[1].close()

    def _restore(self, rec: dict) -> None:
        self.rng.setstate(_rng_state(rec["rng"]))
        self.mix.setstate(_rng_state(rec["mix"]))
        for d, state in zip(self.draw, rec["draw"]):
            d.setstate(_rng_state(state))
        self.empty = [int(v) for v in rec["empty"]]
        refs, slots = self._wanted(rec["buf"])
        filled: list = [None] * len(refs)

        def found_in(s: int, k: int) -> Callable[[int, Item], None]:
            def found(i: int, item: Item) -> None:
                for n in slots.get((s, k, i), ()):
                    filled[n] = ((s, k, i), item)
            return found

        top: dict[tuple[int, int], int] = {}
        for s, k, i in refs:
            top[(s, k)] = max(top.get((s, k), -1), i)
        current = [None if c is None else (int(c[0]), int(c[1])) for c in rec["cur"]]
        # a current shard whose references all lie before its position is read once, for both
        joint = {(s, c[0]) for s, c in enumerate(current) if c is not None and top.get((s, c[0]), 1 << 62) < c[1]}
        for (s, k), last in sorted(top.items()):
            if (s, k) not in joint:
                self._read_refs(self._part(s, k), last, found_in(s, k))
        for s, c in enumerate(current):
            if c is None:
                continue
            k, i_next = c
            opened = self.pipe.open_part(self._part(s, k), self)
            samples: Iterator = iter(())
            if opened is not None:
                first = 0 if (s, k) in joint else i_next
                samples = _split_at(self.pipe.part_samples(self._part(s, k), opened, self, first=first,
                                                           quiet_until=i_next), i_next, found_in(s, k))
            self.current[s] = [k, i_next, samples]
        for s, k in enumerate(rec["up"]):
            if k is not None:
                self.upcoming[s] = (int(k), self.pipe.open_part(self._part(s, int(k)), self))
        self._install_buffer(refs, filled)


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
    """Everything a worker needs to produce its batches; small and picklable.  ``resume`` holds
    the saved reader positions (stream -> record) that a resumed run starts from."""

    def __init__(self, sources: list[ShardSet], weights: list[float], *, rank: int, world: int, batch_size: int,
                 num_batches: int, seed: int, shuffle: bool, resampled: bool, buffer: int, preprocess: Callable,
                 tokenizer: Callable, max_pixels: int, retries: int, endpoint: str | None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        self.sources, self.weights = sources, weights
        self.rank, self.world, self.batch_size, self.num_batches = rank, world, batch_size, num_batches
        self.seed, self.shuffle, self.resampled, self.buffer = seed, shuffle, resampled, buffer
        self.preprocess, self.tokenizer, self.max_pixels = preprocess, tokenizer, max_pixels
        self.retries, self.endpoint, self.block_size = retries, endpoint, block_size
        self.shards = [s for src in sources for s in src.shards]
        known = all(src.counts is not None for src in sources)
        self.counts = [c for src in sources for c in src.counts] if known else None
        self.names = shard_names(self.shards)
        self.resume: dict[int, dict] = {}

    # -- raw samples

    def _on_retry(self, url: str, offset: int, exc: BaseException) -> None:
        self.counter.retries += 1
        log.warning("retrying %s at byte %d after %s", safe_url(url), offset, type(exc).__name__)

    def open_part(self, part: ShardPart, owner: Any) -> Any:
        """The shard's byte stream (remote ones start reading ahead now), or None if it cannot
        open (counted in ``owner.counter``)."""
        try:
            return open_shard(part.shard, self.retries, self.endpoint, self.block_size, self._on_retry)
        except StorageAuthError as e:
            raise DataError(str(e)) from None
        except OSError as e:
            owner.counter.skip("shard_failed", self.names[part.shard])
            log.warning("cannot open shard %s: %s", self.names[part.shard], e)
            return None

    def part_samples(self, part: ShardPart, stream: Any, owner: Any, first: int = 0,
                     quiet_until: int = 0) -> Iterator[tuple[int, Item]]:
        """(raw index, item) of the usable samples of ``part`` from raw index ``first`` on.  Unusable
        ones are counted in ``owner.counter``, except below ``quiet_until``: a resumed reader
        re-reads those, and the run before counted them."""
        name = self.names[part.shard]
        tally = _Tally(owner, quiet=quiet_until > 0)
        uncounted = SkipCounter()
        first = max(first, part.start)
        with stream:
            for i, sample in enumerate(iter_tar(stream, name, tally)):
                tally.quiet = i + 1 < quiet_until  # a bad archive found now is sample i + 1's
                if i >= first and i % part.count == part.index:
                    item = self._usable(sample, name, owner.counter if i >= quiet_until else uncounted)
                    if item is not None:
                        yield i, item
                if part.stop is not None and i + 1 >= part.stop:
                    return

    def _usable(self, sample: dict[str, Any], name: str, counter: SkipCounter) -> Item | None:
        counter.samples += 1
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            counter.skip("missing_image", name)
            return None
        caption, why = caption_of(sample)
        if why is None:
            why = check_image_header(sample[ext], self.max_pixels)
        if why is not None:
            counter.skip(why, name)
            return None
        return f"{name}/{sample['__key__']}", name, sample[ext], caption

    def stream_parts(self, epoch: int, stream: int, streams: int) -> list[ShardPart]:
        """This stream's shard parts for ``epoch`` (see the module docstring's balance policy)."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(stable_seed(self.seed, epoch, "shards")).shuffle(order)
        shards = [self.shards[i] for i in order]
        if self.counts is not None and sum(self.counts) > 0:
            counts = [self.counts[i] for i in order]
            quotas = stream_quotas(self.num_batches, self.batch_size, self.world, streams)
            start, length = sample_ranges(sum(counts), quotas)[self.rank * streams + stream]
            return range_parts(shards, counts, start, length)
        parts = split_parts([ShardPart(s) for s in shards], self.world, self.rank)
        return split_parts(parts, streams, stream)

    # -- batches

    def _plan(self) -> list[int]:
        """What a saved position is only valid for."""
        return [self.world, self.rank, self.num_batches, self.batch_size, self.buffer, int(self.resampled),
                int(self.shuffle)]

    def _saved_position(self, epoch: int, stream: int, streams: int, skip: int) -> dict | None:
        record = self.resume.get(stream)
        if not skip or record is None:
            return None
        last = stream + (skip - 1) * streams  # the stream's batch just before the start batch
        if (record.get("epoch"), record.get("streams"), record.get("batch"), list(record.get("plan", ()))) \
                == (epoch, streams, last, self._plan()):
            return record
        log.warning("rank %d stream %d: the saved reader position is for another point or setup; replaying "
                    "epoch %d from its start", self.rank, stream, epoch)
        return None

    def stream_batches(self, epoch: int, start_batch: int, stream: int, streams: int) -> Iterator[dict]:
        """Batches ``n = stream, stream + streams, ...`` (``n >= start_batch``) of this rank's epoch.

        Each carries ``position``, the stream's reader state right after it was formed; started
        from the position of the batch before ``start_batch``, the stream re-reads only what
        that position references.  Without one it replays the epoch's raw samples up to there."""
        quota = len(range(stream, self.num_batches, streams))
        skip = len(range(stream, min(start_batch, self.num_batches), streams))
        record = self._saved_position(epoch, stream, streams, skip)
        counter = self.counter
        reader: StreamReader = (ResampledReader(self, epoch, stream, counter, record) if self.resampled
                                else PassReader(self, epoch, stream, streams, counter, record))
        try:
            if record is not None:
                counter.restored_streams += 1
            elif skip:
                counter.replayed_batches += skip
                reader.counting = False
                for _ in itertools.islice(reader, skip * self.batch_size):
                    pass
                reader.counting = True
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
            for j in range(skip, quota):
                chunk = list(itertools.islice(reader, self.batch_size))
                n = stream + j * streams
                position = {"epoch": epoch, "stream": stream, "streams": streams, "batch": n, "plan": self._plan(),
                            **reader.position()}
                batch = collate(chunk, self.preprocess, self.tokenizer, self.max_pixels,
                                stable_seed(self.seed, epoch, self.rank, n, "augment"), counter)
                batch["position"] = position
                batch["stats"] = counter.snapshot()
                yield batch
        finally:
            reader.close()


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
        self.positions: dict[int, dict] = {}  # stream -> position after its latest batch handed out
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
            # taken as the trainer receives the batch, not as a worker prefetches it
            position = batch.pop("position", None)
            if position is not None:
                self.positions[position["stream"]] = position
            batch["stats"] = self.book.check(self.max_skip_fraction)
            yield batch

    def local_state(self) -> dict[str, Any]:
        """This rank's part of a checkpoint: the latest position of each stream and the counts."""
        return {"streams": [self.positions[s] for s in sorted(self.positions)], "stats": self.book.merged()}

    def restore(self, streams: list[dict], stats: list[dict]) -> None:
        """Continue from a checkpoint: ``streams`` are saved stream positions, ``stats`` earlier counts."""
        for snap in stats:
            self.book.add_base(snap)
        self.positions = {int(r["stream"]): r for r in streams}
        pipeline = getattr(self.dataset, "pipeline", None)
        if pipeline is not None:
            pipeline.resume = dict(self.positions)
        if self._loader is not None:  # workers copy the pipeline when they start: start new ones
            self.book.fold()
            self._loader = None


# ---------------------------------------------------------------- the Source


@dataclass
class WdsPlan:
    """A webdataset split resolved, before any model or reader exists: its shards, sample count
    and mixing weights."""

    sources: list[ShardSet]
    weights: list[float]
    resampled: bool
    endpoint: str | None
    num_samples: int
    flag: str

    @property
    def num_shards(self) -> int:
        return sum(len(s.shards) for s in self.sources)

    def num_batches(self, batch_size: int, world: int) -> int:
        n = self.num_samples // (batch_size * world)
        if n == 0:
            raise ConfigError(f"{self.num_samples} samples in {self.flag} cannot fill one global batch of "
                              f"{batch_size * world}; lower --batch-size or add data")
        return n


def plan_webdataset(cfg: Config, split: str) -> WdsPlan:
    """Resolve ``--train-data``/``--val-data``: list the shards and read their sample counts.  Every
    problem found here is a one-line ConfigError (see ``urls``)."""
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
        unknown = [s.url for s in sources if s.num_samples is None]
        if unknown:
            which = "--train-num-samples" if train else "--val-num-samples"
            raise ConfigError(f"cannot tell how many samples {safe_url(unknown[0])} holds (no sizes.json or "
                              f"__len__ next to its shards); pass {which} N")
        num_samples = sum(s.num_samples for s in sources)
    return WdsPlan(sources, weights, resampled, endpoint, int(num_samples), flag)


class WebDatasetSource:
    """``--dataset-type webdataset``: see the module docstring for the pipeline and its policies.
    ``plan`` (from ``plan_webdataset``) saves resolving the URLs a second time."""

    def __init__(self, cfg: Config, split: str, preprocess: Callable, tokenizer: Callable, rank: int, world: int,
                 batch_size: int, *, block_size: int = DEFAULT_BLOCK_SIZE, multiprocessing_context: Any = None,
                 plan: WdsPlan | None = None):
        d = cfg.data
        train = split == "train"
        plan = plan or plan_webdataset(cfg, split)
        self.num_samples = plan.num_samples
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.num_batches = plan.num_batches(batch_size, world)
        self.sources = plan.sources
        self.pipeline = ShardPipeline(
            plan.sources, plan.weights, rank=rank, world=world, batch_size=batch_size, num_batches=self.num_batches,
            seed=cfg.run.seed + (0 if train else 7919), shuffle=train, resampled=plan.resampled,
            buffer=max(1, d.shuffle_buffer), preprocess=preprocess, tokenizer=tokenizer,
            max_pixels=d.max_image_pixels, retries=d.shard_retries, endpoint=plan.endpoint, block_size=block_size)
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

    def local_position(self) -> dict[str, Any]:
        return self._loader.local_state()

    def restore_local_position(self, streams: list[dict], stats: list[dict]) -> None:
        self._loader.restore(streams, stats)
