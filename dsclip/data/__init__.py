"""Data sources.  Every source yields the same batches on every rank count it supports and can
start in the middle of an epoch, which is what exact resume is built on.

A source is an object with:
  ``num_samples``  global samples per epoch,
  ``num_batches``  batches per rank per epoch (the same on every rank),
  ``batches(epoch, start_batch=0)``  an iterator of ``Batch`` dicts for this rank, beginning
      at batch ``start_batch`` of ``epoch`` without producing the ones before it,
  ``stats()``  counters (skipped samples by kind and shard) for the progress line; may be {},
and, where a resume needs more than ``(epoch, start_batch)`` to be exact and cheap,
  ``local_position()`` / ``restore_local_position(streams, stats)``  this rank's reader state
      for checkpoints (see ``position_state``).

A ``Batch`` is a dict: ``image`` float [B,3,H,W], ``text`` long [B,L], ``keys`` list[str]
(a stable id per sample, used to prove resume exactness), and optionally ``stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
                 rank: int, world: int, batch_size: int | None = None, checked: Preflight | None = None
                 ) -> Source | None:
    """The train or val source for this rank, or None when that split has no data.  ``checked``,
    the split's ``preflight``, saves resolving (listing) its shards a second time."""
    d = cfg.data
    urls = d.train_data if split == "train" else d.val_data
    kind = resolve_dataset_type(urls, d.dataset_type)
    if split == "val" and not urls and (kind != "synthetic" or d.dataset_type == "auto"):
        return None  # synthetic val data only when asked for explicitly
    bs = batch_size or cfg.optim.batch_size
    if kind == "synthetic":
        from .synthetic import SyntheticSource

        n = _synthetic_count(cfg, split)
        size = (d.synthetic_image_size,) * 2 if d.synthetic_image_size else image_size
        return SyntheticSource(num_samples=n, batch_size=bs, rank=rank, world=world, tokenizer=tokenizer,
                               image_size=size, seed=cfg.run.seed + (0 if split == "train" else 7919),
                               shuffle=(split == "train"), count_flag=_count_flag(split))
    if kind == "csv":
        from .csv import CsvSource

        return CsvSource(cfg, split, preprocess, tokenizer, rank, world, bs,
                         rows=checked.plan if checked is not None else None)
    if kind == "webdataset":
        from .wds import WebDatasetSource

        return WebDatasetSource(cfg, split, preprocess, tokenizer, rank, world, bs,
                                plan=checked.plan if checked is not None else None)
    raise ConfigError(f"unknown --dataset-type {kind!r}")


# ---------------------------------------------------------------- checks before any model


@dataclass
class Preflight:
    """What a split resolves to: its kind, samples per epoch, batches per rank and shard count."""

    kind: str
    num_samples: int
    num_batches: int
    num_shards: int = 0
    plan: Any = None  # what the source can reuse: the webdataset plan (``wds.WdsPlan``), the CSV rows


def preflight(cfg: Config, split: str = "train", world: int = 1, batch_size: int | None = None) -> Preflight | None:
    """Resolve ``split``'s data without a model: shard URLs, sample counts and whether they fill
    one global batch of ``batch_size * world``.  Raises the ConfigError the source would raise at
    construction (no shard matches, missing bucket, denied access, too few samples); None when
    the split has no data."""
    d = cfg.data
    urls = d.train_data if split == "train" else d.val_data
    kind = resolve_dataset_type(urls, d.dataset_type)
    if split == "val" and not urls and (kind != "synthetic" or d.dataset_type == "auto"):
        return None
    bs = batch_size or cfg.optim.batch_size
    if kind == "synthetic":
        from .synthetic import synthetic_batches

        n = _synthetic_count(cfg, split)
        return Preflight(kind, n, synthetic_batches(n, bs, world, _count_flag(split)))
    if kind == "csv":
        from .csv import csv_rows

        n, batches, rows = csv_rows(cfg, split, bs, world)
        return Preflight(kind, n, batches, plan=rows)
    if kind == "webdataset":
        from .wds import plan_webdataset

        plan = plan_webdataset(cfg, split)
        return Preflight(kind, plan.num_samples, plan.num_batches(bs, world), plan.num_shards, plan)
    raise ConfigError(f"unknown --dataset-type {kind!r}")


def _count_flag(split: str) -> str:
    return "--train-num-samples" if split == "train" else "--val-num-samples"


def _synthetic_count(cfg: Config, split: str) -> int:
    d = cfg.data
    return (d.train_num_samples if split == "train" else d.val_num_samples) or (1024 if split == "train" else 256)


# ---------------------------------------------------------------- counters over all ranks


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def global_stats(source: Any) -> dict[str, Any]:
    """The data counters of every rank added up (``{}`` for sources without any).  Collective:
    call it on every rank."""
    from .skips import merge_summaries

    local = source.stats() if source is not None and hasattr(source, "stats") else {}
    gathered = _gather(local) if hasattr(source, "local_position") else [local]
    if not any(gathered):
        return {}
    return merge_summaries(gathered)


# ---------------------------------------------------------------- reader positions in checkpoints


def position_state(source: Any) -> dict[str, Any] | None:
    """Every rank's reader positions and counters, for the checkpoint's client state (None for
    sources that need none).  Collective: call it on every rank.  DeepSpeed writes only rank 0's
    client state, so each rank's part travels there.  Plain ints, lists, tuples and dicts only,
    so the checkpoint stays loadable with ``weights_only=True``."""
    if not hasattr(source, "local_position"):
        return None
    ranks = _gather(source.local_position())
    return {"version": 1, "world": len(ranks), "ranks": ranks}


def restore_position(source: Any, state: dict[str, Any] | None, rank: int, world: int) -> None:
    """Hand this rank's part of a checkpoint's ``position_state`` to the source.  Saved by another
    world size, the positions do not apply (the streams are others); the counts go to rank 0."""
    if not state or not hasattr(source, "restore_local_position"):
        return
    ranks = state["ranks"]
    if state.get("world") == world:
        mine = ranks[rank] or {}
        source.restore_local_position(mine.get("streams", []), [mine["stats"]] if mine.get("stats") else [])
    else:
        stats = [r["stats"] for r in ranks if r and r.get("stats")] if rank == 0 else []
        source.restore_local_position([], stats)


# ---------------------------------------------------------------- resuming with the same data

# (config section, field, flag) of the settings a source's sample sequence depends on
_SEQUENCE_SETTINGS = {
    "all": [("data", "train_data", "--train-data"), ("data", "train_num_samples", "--train-num-samples"),
            ("run", "seed", "--seed")],
    "webdataset": [("data", "dataset_resampled", "--dataset-resampled"),
                   ("data", "train_data_upsampling_factors", "--train-data-upsampling-factors")],
}
_SAME_WORLD_SETTINGS = {"webdataset": [("data", "workers", "--workers"), ("data", "shuffle_buffer", "--shuffle-buffer")]}


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None or value == "" else str(value)


def check_resume_data(cfg: Config, saved: dict | None, saved_world: int | None, world: int) -> str | None:
    """Refuse a resume whose data settings differ from the checkpoint's (``saved`` is its config
    dict): the run would not continue the same sample sequence.  Returns a warning when only the
    world size changed and the source cannot keep the sequence across that (webdataset); None
    otherwise.  Raises ConfigError naming every differing setting and the fix."""
    if not saved or "data" not in saved:
        return None
    now = cfg.to_dict(mask_secrets=True)  # the saved config was masked the same way
    kind = resolve_dataset_type(cfg.data.train_data, cfg.data.dataset_type)
    saved_kind = resolve_dataset_type(saved["data"].get("train_data") or "", saved["data"].get("dataset_type", "auto"))
    diffs: list[tuple[str, Any, Any]] = []
    if kind != saved_kind:
        diffs.append(("--dataset-type", kind, saved_kind))
    same_world = saved_world is None or saved_world == world
    settings = _SEQUENCE_SETTINGS["all"] + _SEQUENCE_SETTINGS.get(kind, [])
    if same_world:
        settings += _SAME_WORLD_SETTINGS.get(kind, []) + [("optim", "batch_size", "--batch-size")]
    for section, name, flag in settings:
        if name in saved.get(section, {}) and now[section][name] != saved[section][name]:
            diffs.append((flag, now[section][name], saved[section][name]))
    if not same_world:
        bs, saved_bs = cfg.optim.batch_size, saved.get("optim", {}).get("batch_size")
        if saved_bs is not None and bs * world != saved_bs * saved_world:
            diffs.append((f"the global batch (--batch-size x {world} ranks)", bs * world,
                          f"{saved_bs} x {saved_world} = {saved_bs * saved_world}"))
    if diffs:
        listed = ", ".join(f"{flag} {_shown(v)} (checkpoint: {_shown(old)})" for flag, v, old in diffs)
        raise ConfigError(f"the checkpoint was saved with other data settings: {listed}; a resumed run must "
                          f"read the same sample sequence, so resume with the checkpoint's values, or start a "
                          f"new run (another --name, --pretrained from its weights)")
    if not same_world and kind == "webdataset":
        return (f"the checkpoint was saved by {saved_world} ranks and this job has {world}: the shards are dealt "
                f"to other streams, so from here on the sample order differs from the original run's "
                f"(resume with {saved_world} ranks to keep it exact)")
    return None
