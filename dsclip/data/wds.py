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

import itertools
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..config import Config, ConfigError
from .readers import (
    Item,
    PassReader,
    ResampledReader,
    ShardPart,
    StreamReader,
    Tally,
    range_parts,
    sample_ranges,
    shard_names,
    split_parts,
    stable_seed,
    stream_quotas,
)
from .s3 import DEFAULT_BLOCK_SIZE, StorageAuthError, open_shard, s3_endpoint, safe_url
from .samples import batches_per_rank, caption_of, check_image_header, collate
from .skips import DataError, SkipCounter, StatsBook
from .tar import iter_tar
from .urls import ShardSet, mixing_weights, resolve_sources

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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
        tally = Tally(owner, quiet=quiet_until > 0)
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
        return batches_per_rank(self.num_samples, batch_size, world, f"{self.num_samples} samples in {self.flag}",
                                "lower --batch-size or add data")


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
