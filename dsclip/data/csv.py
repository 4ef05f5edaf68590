"""``--dataset-type csv``: image paths and captions from a CSV/TSV file.

Rows are read once at construction.  Epoch ``e`` visits the rows in a permutation seeded by
(seed, e) (the file order for validation); global batch ``n`` is positions
``[n*B*world, (n+1)*B*world)`` of it and rank ``r`` takes its ``r``-th slice of ``B``, so every
rank yields ``num_samples // (B*world)`` batches, the assignment of samples to ranks is a pure
function of (seed, epoch), and ``batches(epoch, k)`` starts at batch ``k`` at no cost.

Image paths may be absolute, relative to the CSV file's folder, or relative to the working
directory (tried in that order).  A row whose image is missing or undecodable, or whose
caption is empty, is replaced by another sample of the same batch and counted in ``stats()``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..config import Config, ConfigError
from .readers import stable_seed
from .samples import batches_per_rank, collate
from .wds import BatchLoader, BatchStream, CountingPipeline


class CsvPipeline(CountingPipeline):
    def __init__(self, paths: list[str], captions: list[str], base: str, name: str, *, rank: int, world: int,
                 batch_size: int, num_samples: int, num_batches: int, seed: int, shuffle: bool,
                 preprocess: Callable, tokenizer: Callable, max_pixels: int):
        self.paths, self.captions, self.base, self.name = paths, captions, base, name
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.num_samples, self.num_batches, self.seed, self.shuffle = num_samples, num_batches, seed, shuffle
        self.preprocess, self.tokenizer, self.max_pixels = preprocess, tokenizer, max_pixels

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.paths)
        if not self.shuffle:
            perms = [torch.arange(n)] * (-(-self.num_samples // n))
        else:
            g = torch.Generator().manual_seed(stable_seed(self.seed, epoch, "csv") % (2 ** 63))
            perms = [torch.randperm(n, generator=g) for _ in range(-(-self.num_samples // n))]
        return torch.cat(perms)[: self.num_samples]

    def _read(self, path: str) -> bytes | None:
        candidates = [path] if os.path.isabs(path) else [os.path.join(self.base, path), path]
        for p in candidates:
            try:
                with open(p, "rb") as fh:
                    return fh.read()
            except OSError:
                continue
        return None

    def stream_batches(self, epoch: int, start_batch: int, stream: int, streams: int) -> Iterator[dict]:
        order = self.order(epoch)
        first = stream + streams * len(range(stream, min(start_batch, self.num_batches), streams))
        for n in range(first, self.num_batches, streams):
            lo = n * self.batch_size * self.world + self.rank * self.batch_size
            rows = order[lo: lo + self.batch_size].tolist()
            self.counter.samples += len(rows)
            samples = [(f"{self.name}/{i:09d}", self.name, self._read(self.paths[i]), self.captions[i]) for i in rows]
            batch = collate(samples, self.preprocess, self.tokenizer, self.max_pixels,
                            stable_seed(self.seed, epoch, self.rank, n, "augment"), self.counter)
            batch["stats"] = self.counter.snapshot()
            yield batch


def read_rows(path: str, img_key: str, caption_key: str, separator: str) -> tuple[list[str], list[str]]:
    if not os.path.isfile(path):
        raise ConfigError(f"CSV file not found: {path}; pass an existing .csv/.tsv file")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=separator)
        header = reader.fieldnames or []
        for key, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
            if key not in header:
                hint = " (is --csv-separator right?)" if len(header) <= 1 else ""
                raise ConfigError(f"{path} has no column '{key}' (columns: {', '.join(header)}){hint}; "
                                  f"set {flag}")
        paths, captions = [], []
        for row in reader:
            paths.append(row[img_key] or "")
            captions.append((row[caption_key] or "").strip())
    if not paths:
        raise ConfigError(f"{path} has no rows; add data or pick another file")
    return paths, captions


def _rows(cfg: Config, split: str) -> tuple[list[str], list[str]]:
    d = cfg.data
    path = d.train_data if split == "train" else d.val_data
    if "::" in path:
        raise ConfigError("--dataset-type csv reads one file; join the CSVs into one or use webdataset shards")
    return read_rows(path, d.csv_img_key, d.csv_caption_key, d.csv_separator)


def _batches(num_samples: int, path: str, batch_size: int, world: int) -> int:
    return batches_per_rank(num_samples, batch_size, world, f"{num_samples} rows in {path}",
                            "lower --batch-size or add data")


def csv_rows(cfg: Config, split: str, batch_size: int, world: int
             ) -> tuple[int, int, tuple[list[str], list[str]]]:
    """(samples per epoch, batches per rank, the rows) of a CSV split, checked as ``CsvSource``
    checks them; ``CsvSource`` takes the rows, so the file is read once."""
    d = cfg.data
    given = d.train_num_samples if split == "train" else d.val_num_samples
    rows = _rows(cfg, split)  # checks the file and its columns
    n = int(given) if given else len(rows[0])
    return n, _batches(n, d.train_data if split == "train" else d.val_data, batch_size, world), rows


class CsvSource:
    """See the module docstring."""

    def __init__(self, cfg: Config, split: str, preprocess: Callable, tokenizer: Callable, rank: int, world: int,
                 batch_size: int, *, multiprocessing_context: Any = None,
                 rows: tuple[list[str], list[str]] | None = None):
        d = cfg.data
        train = split == "train"
        path = d.train_data if train else d.val_data
        paths, captions = rows if rows is not None else _rows(cfg, split)
        given = d.train_num_samples if train else d.val_num_samples
        self.num_samples = int(given) if given else len(paths)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.num_batches = _batches(self.num_samples, path, batch_size, world)
        self.pipeline = CsvPipeline(
            paths, captions, os.path.dirname(os.path.abspath(path)), os.path.basename(path), rank=rank, world=world,
            batch_size=batch_size, num_samples=self.num_samples, num_batches=self.num_batches,
            seed=cfg.run.seed + (0 if train else 7919), shuffle=train, preprocess=preprocess, tokenizer=tokenizer,
            max_pixels=d.max_image_pixels)
        self._loader = BatchLoader(lambda state: BatchStream(self.pipeline, state), max(0, d.workers),
                                   persistent=train, max_skip_fraction=d.max_skip_fraction,
                                   multiprocessing_context=multiprocessing_context)

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]:
        if start_batch >= self.num_batches:
            return iter(())
        return self._loader(epoch, start_batch)

    def stats(self) -> dict[str, Any]:
        return self._loader.book.summary()

    def local_position(self) -> dict[str, Any]:
        # batch n is a pure function of (seed, epoch, n): only the counts need keeping
        return self._loader.local_state()

    def restore_local_position(self, streams: list[dict], stats: list[dict]) -> None:
        self._loader.restore(streams, stats)
