"""Data sources.  Every source yields the same batches on every rank count it supports and can
start in the middle of an epoch, which is what exact resume is built on.

A source is an object with:
  ``num_samples``  global samples per epoch,
  ``num_batches``  batches per rank per epoch (the same on every rank),
  ``batches(epoch, start_batch=0)``  an iterator of ``Batch`` dicts for this rank, beginning
      at batch ``start_batch`` of ``epoch`` without producing the ones before it,
  ``stats()``  counters (skipped samples by kind and shard) for the progress line; may be {}.

A ``Batch`` is a dict: ``image`` float [B,3,H,W], ``text`` long [B,L], ``keys`` list[str]
(a stable id per sample, used to prove resume exactness), and optionally ``stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..config import Config, ConfigError


class Source(Protocol):
    num_samples: int
    num_batches: int

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[dict[str, Any]]: ...

    def stats(self) -> dict[str, Any]: ...


def resolve_dataset_type(urls: str, dataset_type: str) -> str:
    if dataset_type != "auto":
        return dataset_type
    if not urls:
        return "synthetic"
    first = urls.split("::")[0]
    if first.endswith((".csv", ".tsv")):
        return "csv"
    return "webdataset"


def build_source(cfg: Config, split: str, preprocess: Callable, tokenizer: Callable, image_size: tuple[int, int],
                 rank: int, world: int, batch_size: int | None = None) -> Source | None:
    """The train or val source for this rank, or None when that split has no data."""
    d = cfg.data
    urls = d.train_data if split == "train" else d.val_data
    kind = resolve_dataset_type(urls, d.dataset_type)
    if split == "val" and not urls and (kind != "synthetic" or d.dataset_type == "auto"):
        return None  # synthetic val data only when asked for explicitly
    bs = batch_size or cfg.optim.batch_size
    if kind == "synthetic":
        from .synthetic import SyntheticSource

        n = (d.train_num_samples if split == "train" else d.val_num_samples) or (1024 if split == "train" else 256)
        size = (d.synthetic_image_size,) * 2 if d.synthetic_image_size else image_size
        return SyntheticSource(num_samples=n, batch_size=bs, rank=rank, world=world, tokenizer=tokenizer,
                               image_size=size, seed=cfg.run.seed + (0 if split == "train" else 7919),
                               shuffle=(split == "train"))
    if kind == "csv":
        from .csv import CsvSource

        return CsvSource(cfg, split, preprocess, tokenizer, rank, world, bs)
    if kind == "webdataset":
        from .wds import WebDatasetSource

        return WebDatasetSource(cfg, split, preprocess, tokenizer, rank, world, bs)
    raise ConfigError(f"unknown --dataset-type {kind!r}")
