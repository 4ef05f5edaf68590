"""A small sequential tar reader: tar members straight into memory (nothing touches the disk),
unsafe member names skipped, grouped into WebDataset samples."""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterator
from typing import Any

from .s3 import ShardReadError, StorageAuthError
from .skips import DataError, SkipCounter

log = logging.getLogger(__name__)

MAX_MEMBER_BYTES = 256 << 20


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
