"""Which samples each rank's worker streams read, in which order, and where they are: shard
assignment (whole shards or sample ranges), the seeded shuffle buffer as a resumable
``StreamReader``, with and without resampling."""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .s3 import safe_url
from .skips import DataError, SkipCounter

if TYPE_CHECKING:
    from .wds import ShardPipeline

log = logging.getLogger(__name__)


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from any printable parts; unlike ``hash()`` it is the same in every process."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


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


class Tally:
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
