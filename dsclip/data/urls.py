"""Turning ``--train-data``/``--val-data`` strings into shard lists and sample counts.

Accepted forms, several joined with ``::``:
  ``s3://bucket/prefix/shard-{000000..000127}.tar``, ``s3://bucket/prefix/`` (every .tar there),
  local paths (brace ranges, globs, or a directory meaning every .tar in it), ``http(s)://`` URLs
  (brace ranges) and ``pipe:COMMAND`` (only with ``--allow-pipe-urls``; it runs a shell command).

Everything that can be checked cheaply is checked here, at construction, on every rank: a URL
that matches no shard, a missing bucket or denied access is a ``ConfigError`` with one line
naming the fix, not a hang in a data-loader worker an hour later.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import posixpath
import urllib.error
import urllib.request
from dataclasses import dataclass

import braceexpand

from ..config import ConfigError
from .s3 import read_small, s3_filesystem, safe_url, with_retries

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class ShardSet:
    """The shards of one ``::``-separated source."""

    url: str
    shards: list[str]
    num_samples: int | None  # from sizes.json / __len__, None when unknown
    counts: list[int] | None = None  # per shard, aligned with ``shards``, when known


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def parent_of(url: str) -> str:
    if url.startswith("pipe:"):
        return ""
    return posixpath.dirname(url) if "://" in url else os.path.dirname(url)


def join(parent: str, name: str) -> str:
    return posixpath.join(parent, name) if "://" in parent else os.path.join(parent, name)


def _s3_error(e: BaseException, what: str, endpoint: str | None) -> ConfigError:
    name = type(e).__name__
    if isinstance(e, PermissionError) or "AccessDenied" in str(e) or "Forbidden" in str(e):
        return ConfigError(f"access denied to {what}; check the AWS credentials (AWS_PROFILE or "
                           f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the bucket policy")
    if "Credentials" in name:
        return ConfigError(f"no AWS credentials found for {what}; set AWS_PROFILE or "
                           f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    where = endpoint or "the default AWS endpoint"
    return ConfigError(f"cannot list {what} at {safe_url(where)} ({name}); check --s3-endpoint-url / "
                       f"AWS_ENDPOINT_URL and the network")


def _s3_listdir(fs, parent: str, endpoint: str | None) -> list[str]:
    """``bucket/prefix`` entries (as ``s3://`` URLs); ConfigError for a missing bucket or denied access."""
    bucket = parent.split("/", 1)[0]
    try:
        entries = with_retries(lambda: fs.ls(parent, detail=False, refresh=True))
    except FileNotFoundError:
        entries = None
    except Exception as e:  # noqa: BLE001 - mapped to a one-line user error
        raise _s3_error(e, f"s3://{parent}", endpoint) from None
    if entries is None:
        try:
            with_retries(lambda: fs.ls(bucket, detail=False, refresh=True))
        except FileNotFoundError:
            raise ConfigError(f"S3 bucket '{bucket}' does not exist (from s3://{parent}); check the bucket "
                              f"name and the endpoint (--s3-endpoint-url / AWS_ENDPOINT_URL)") from None
        except Exception as e:  # noqa: BLE001
            raise _s3_error(e, f"s3://{bucket}", endpoint) from None
        entries = []
    return ["s3://" + p for p in entries]


def _expand_s3(url: str, endpoint: str | None) -> list[str]:
    fs = s3_filesystem(endpoint)
    if url.endswith("/") or not posixpath.basename(url).count("."):
        listing = _s3_listdir(fs, url[len("s3://"):].rstrip("/"), endpoint)
        return sorted(u for u in listing if u.endswith(SHARD_SUFFIXES))
    names = list(braceexpand.braceexpand(url))
    out: list[str] = []
    listings: dict[str, set[str]] = {}
    for name in names:
        parent = posixpath.dirname(name)
        if parent not in listings:
            listings[parent] = set(_s3_listdir(fs, parent[len("s3://"):], endpoint))
        if _has_glob(posixpath.basename(name)):
            out += sorted(u for u in listings[parent] if fnmatch.fnmatch(u, name))
        elif name in listings[parent]:
            out.append(name)
    missing = [n for n in names if not _has_glob(n) and n not in listings[posixpath.dirname(n)]]
    if missing and out:
        raise ConfigError(f"{len(missing)} of {len(names)} shards of {url} do not exist (first: {missing[0]}); "
                          f"fix the brace range")
    return out


def _expand_local(url: str) -> list[str]:
    path = url.removeprefix("file://")
    out: list[str] = []
    missing: list[str] = []
    names = list(braceexpand.braceexpand(path))
    for name in names:
        name = os.path.expanduser(name)
        if os.path.isdir(name):
            out += sorted(os.path.join(name, f) for f in os.listdir(name) if f.endswith(SHARD_SUFFIXES))
        elif _has_glob(name):
            out += sorted(glob.glob(name))
        elif os.path.isfile(name):
            out.append(name)
        else:
            missing.append(name)
    if missing and out:
        raise ConfigError(f"{len(missing)} of {len(names)} shards of {url} do not exist (first: {missing[0]}); "
                          f"fix the brace range")
    return out


def _check_http(url: str) -> None:
    try:
        req = urllib.request.Request(url, method="HEAD")
        urllib.request.urlopen(req, timeout=15).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise ConfigError(f"no shard at {safe_url(url)} (HTTP 404); check the URL") from None
        if e.code in (401, 403):
            raise ConfigError(f"access denied to {safe_url(url)} (HTTP {e.code}); check the URL's "
                              f"credentials or permissions") from None
        # other statuses (405 for HEAD, 5xx) are left to the reader's retries
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"cannot reach {safe_url(url)} ({type(e).__name__}); check the host and "
                          f"the network") from None


def expand_url(url: str, allow_pipe: bool, endpoint: str | None) -> list[str]:
    """The shard URLs one source string stands for (in a stable order); ConfigError if none."""
    url = url.strip()
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise ConfigError(f"'{url[:60]}' runs a shell command; pass --allow-pipe-urls if you trust it, "
                              f"or use an s3://, http(s):// or local path")
        return list(braceexpand.braceexpand(url))
    if url.startswith("s3://"):
        shards = _expand_s3(url, endpoint)
    elif url.startswith(("http://", "https://")):
        shards = list(braceexpand.braceexpand(url))
        _check_http(shards[0])
    elif "://" in url and not url.startswith("file://"):
        raise ConfigError(f"unsupported URL scheme in {safe_url(url)}; use s3://, http(s)://, a local "
                          f"path or pipe:")
    else:
        shards = _expand_local(url)
    if not shards:
        raise ConfigError(f"{safe_url(url)} matches no shard; check the path, the brace range "
                          f"(e.g. shard-{{000000..000127}}.tar) and that the .tar files exist")
    return shards


def _read_json(url: str, endpoint: str | None):
    raw = read_small(url, endpoint)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ConfigError(f"{safe_url(url)} is not valid JSON; fix or delete it") from None


def shard_counts(shards: list[str], endpoint: str | None) -> tuple[int | None, list[int] | None]:
    """(total, per-shard counts) of ``shards`` from ``sizes.json`` (basename -> count) or ``__len__``
    beside them; None where unknown.  ``__len__`` gives a per-shard count only for a folder that
    holds a single one of the shards."""
    by_parent: dict[str, list[str]] = {}
    for s in shards:
        if s.startswith("pipe:"):
            return None, None
        by_parent.setdefault(parent_of(s), []).append(s)
    total = 0
    per_shard: dict[str, int] | None = {}
    for parent, members in by_parent.items():
        sizes = _read_json(join(parent, "sizes.json"), endpoint)
        if isinstance(sizes, dict) and all(os.path.basename(m) in sizes for m in members):
            try:
                got = {m: int(sizes[os.path.basename(m)]) for m in members}
            except (TypeError, ValueError):
                raise ConfigError(f"{safe_url(join(parent, 'sizes.json'))} must map shard names to integers; "
                                  f"fix it") from None
            total += sum(got.values())
            if per_shard is not None:
                per_shard.update(got)
            continue
        raw = read_small(join(parent, "__len__"), endpoint)
        if raw is None:
            return None, None
        try:
            n = int(raw.decode().strip())
        except ValueError:
            raise ConfigError(f"{safe_url(join(parent, '__len__'))} must hold one integer; fix it") from None
        total += n
        if per_shard is not None and len(set(members)) == 1:
            per_shard.update({members[0]: n})
        else:
            per_shard = None
    return total, ([per_shard[s] for s in shards] if per_shard is not None else None)


def count_samples(shards: list[str], endpoint: str | None) -> int | None:
    """Samples in ``shards`` from ``sizes.json`` or ``__len__`` beside them (see ``shard_counts``)."""
    return shard_counts(shards, endpoint)[0]


def resolve_sources(spec: str, allow_pipe: bool = False, endpoint: str | None = None) -> list[ShardSet]:
    """Every ``::``-joined source of ``spec`` with its shards and (if known) its sample count."""
    out = []
    for url in spec.split("::"):
        if not url.strip():
            raise ConfigError(f"empty source in '{safe_url(spec)}'; remove the extra '::'")
        shards = expand_url(url, allow_pipe, endpoint)
        total, counts = shard_counts(shards, endpoint)
        out.append(ShardSet(url=url, shards=shards, num_samples=total, counts=counts))
    return out


def mixing_weights(factors: str | None, sources: list[ShardSet], resampled: bool) -> list[float]:
    """Per-source sampling probability for resampled mixing.

    As in open_clip, an upsampling factor multiplies each shard's chance of being drawn, so a
    source's share is factor x shard count (equal-sized sources with ``1::0.5`` mix 2:1).
    """
    n = len(sources)
    if factors is None:
        values = [1.0] * n
    else:
        if not resampled:
            raise ConfigError("--train-data-upsampling-factors needs --dataset-resampled; add it or drop "
                              "the factors")
        try:
            values = [float(v) for v in factors.split("::")]
        except ValueError:
            raise ConfigError(f"--train-data-upsampling-factors {factors!r} must be numbers joined with "
                              f"'::', e.g. 1::0.5") from None
        if len(values) != n:
            raise ConfigError(f"--train-data-upsampling-factors has {len(values)} values but --train-data "
                              f"has {n} sources; give one factor per source")
        if any(v < 0 for v in values) or not any(v > 0 for v in values):
            raise ConfigError("--train-data-upsampling-factors must be >= 0 with at least one > 0")
    raw = [v * len(s.shards) for v, s in zip(values, sources)]
    total = sum(raw)
    return [r / total for r in raw]
