"""Counting unusable samples by kind and shard, in every worker and over every rank, and the
``DataError`` that stops training when the data cannot feed it."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

MIN_SAMPLES_FOR_SKIP_CHECK = 100


class DataError(RuntimeError):
    """The data cannot feed training: too many unreadable samples, or a stream with none."""


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
