"""Zero-shot classification, retrieval metrics and validation loss, and when to run them.

Every function here works on one process or on many, and on a plain open_clip model or a
DeepSpeed engine under any ZeRO stage.  Two rules make ZeRO-3 work:
  * the model is only ever called through its ``forward`` (``model(image=..., text=...)``),
    because ZeRO-3 gathers partitioned parameters in forward hooks;
  * every rank calls forward the same number of times, in the same order: ``lockstep`` keeps
    ranks that ran out of data stepping with a blank batch until the last rank is done.

Metrics equal a single-process computation over the whole set: zero-shot counts are summed
over ranks, and retrieval gathers every rank's features before scoring (rows split over ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, ConfigError
from .zeroshot_data import LabelledDataset, fill_template, load_zeroshot_datasets

Group = dist.ProcessGroup | None
RECALL_AT = (1, 5, 10)


# ---------------------------------------------------------------- calling the model


def _distributed(world: int) -> bool:
    return world > 1 and dist.is_available() and dist.is_initialized()


def _module(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the open_clip model


@contextmanager
def eval_mode(model: nn.Module):
    """Eval mode and no_grad; restores the previous mode.  A DeepSpeed engine forwards
    train()/eval() to its module but never updates its own ``training`` flag, so read the module's."""
    was_training = _module(model).training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def input_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype the model's parameters are in (bf16 under a bf16 engine)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def forward_features(
    model: nn.Module, image: Tensor | None = None, text: Tensor | None = None
) -> dict[str, Any]:
    """``model(image=, text=)`` as a dict, whether the model was built with ``output_dict`` or not."""
    out = model(image=image, text=text)
    if isinstance(out, dict):
        return out
    return dict(zip(("image_features", "text_features", "logit_scale", "logit_bias"), out))


def lockstep(batches: Iterable[Any], world: int, group: Group, device: torch.device) -> Iterator[Any | None]:
    """Yield this rank's batches, then ``None`` (a padding step: forward a blank batch and
    discard it) until every rank is out of data.  One tiny all-reduce per step."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        if _distributed(world):
            more = torch.tensor([0.0 if batch is None else 1.0], device=device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX, group=group)
            if more.item() == 0:
                return
        elif batch is None:
            return
        yield batch


def gather_rows(x: Tensor, world: int, group: Group) -> Tensor:
    """Concatenate ``x`` [n_r, ...] from every rank in rank order; ``n_r`` may differ per rank."""
    if not _distributed(world):
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes_ = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes_), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes_)])


def _scalar(value: Any) -> Tensor | None:
    return None if value is None else torch.as_tensor(value).float().reshape(-1)[0]


# ---------------------------------------------------------------- zero-shot classification


def zeroshot_classifier(
    model: nn.Module,
    tokenizer: Callable,
    classnames: list[str],
    templates: list[str],
    device: torch.device | str,
    rank: int = 0,
    world: int = 1,
    group: Group = None,
    batch_size: int = 256,
) -> Tensor:
    """Class embeddings [C, D]: per class, the mean of the L2-normalised embeddings of every
    template, renormalised.  With several ranks each embeds a contiguous block of classes and
    the blocks are all-gathered; every rank must call this with the same arguments."""
    device = torch.device(device)
    n_cls = len(classnames)
    per_rank = math.ceil(n_cls / world) if _distributed(world) else n_cls
    lo = rank * per_rank if _distributed(world) else 0
    mine = range(lo, min(n_cls, lo + per_rank))
    texts = [(c - lo, fill_template(t, classnames[c])) for c in mine for t in templates]
    chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    sums: Tensor | None = None
    with eval_mode(model):
        for chunk in lockstep(chunks, world, group, device):
            strings = [t for _, t in chunk] if chunk is not None else [""]
            feats = forward_features(model, text=tokenizer(strings).to(device))["text_features"].float()
            if sums is None:
                sums = torch.zeros(per_rank, feats.shape[1], device=device)
            if chunk is not None:
                idx = torch.tensor([c for c, _ in chunk], device=device)
                sums.index_add_(0, idx, F.normalize(feats, dim=-1))
    assert sums is not None  # every rank runs at least one (possibly padding) forward
    classifier = F.normalize(sums, dim=-1)
    if _distributed(world):
        parts = [torch.empty_like(classifier) for _ in range(world)]
        dist.all_gather(parts, classifier.contiguous(), group=group)
        classifier = torch.cat(parts)
    return classifier[:n_cls]


def evaluate_zeroshot(
    model: nn.Module,
    dataset: LabelledDataset,
    classifier: Tensor,
    rank: int,
    world: int,
    group: Group,
    batch_size: int,
    workers: int = 0,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (top-5 capped at the number of classes) of ``dataset`` with
    ``classifier`` [C, D]; logits are 100 x cosine similarity.  Each rank classifies its own
    share; the correct/total counts are summed over ``group``."""
    device = classifier.device
    dtype = input_dtype(model)
    n_cls = classifier.shape[0]
    k = min(5, n_cls)
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-k hits, samples
    with eval_mode(model):
        batches = dataset.loader(rank, world, batch_size, workers)
        for batch in lockstep(batches, world, group, device):
            images = batch[0] if batch is not None else dataset.dummy_batch()
            feats = forward_features(model, image=images.to(device, dtype))["image_features"].float()
            if batch is None:
                continue
            labels = batch[1].to(device)
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_cls):
                raise ValueError(
                    f"zero-shot dataset '{dataset.name}' has label {int(labels.max())} outside "
                    f"0..{n_cls - 1}; its class-names file has {n_cls} names"
                )
            logits = 100.0 * F.normalize(feats, dim=-1) @ classifier.T
            hits = logits.topk(k, dim=1).indices == labels[:, None]
            counts += torch.tensor(
                [int(hits[:, 0].sum()), int(hits.any(dim=1).sum()), len(labels)],
                dtype=counts.dtype,
                device=device,
            )
    if _distributed(world):
        dist.all_reduce(counts, group=group)
    top1, topk, total = counts.tolist()
    if total == 0:
        raise RuntimeError(f"zero-shot dataset '{dataset.name}' yielded no samples")
    return {"top1": top1 / total, "top5": topk / total, "num_samples": total}


# ---------------------------------------------------------------- retrieval and validation loss


def embed_pairs(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    world: int,
    group: Group,
    device: torch.device,
    dummy: dict[str, Tensor],
) -> dict[str, Any]:
    """This rank's image and text features (fp32), sample keys, and the model's logit scale/bias."""
    dtype = input_dtype(model)
    images, texts, keys = [], [], []
    has_keys = True
    scale = bias = None
    with eval_mode(model):
        for batch in lockstep(batches, world, group, device):
            b = batch if batch is not None else dummy
            out = forward_features(model, image=b["image"].to(device, dtype), text=b["text"].to(device))
            scale, bias = _scalar(out.get("logit_scale")), _scalar(out.get("logit_bias"))
            if batch is None:
                images.append(out["image_features"].float()[:0])
                texts.append(out["text_features"].float()[:0])
                continue
            images.append(out["image_features"].float())
            texts.append(out["text_features"].float())
            if "keys" in batch and batch["keys"] is not None:
                keys += list(batch["keys"])
            else:
                has_keys = False
    if not images:
        raise RuntimeError("the validation set is empty on every rank")
    return {
        "image": torch.cat(images),
        "text": torch.cat(texts),
        "keys": keys if has_keys else None,
        "logit_scale": scale,
        "logit_bias": bias,
    }


def _first_occurrences(keys: list[str]) -> Tensor:
    seen: set[str] = set()
    keep = []
    for k in keys:
        keep.append(k not in seen)
        seen.add(k)
    return torch.tensor(keep, dtype=torch.bool)


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float | None = None,
    rank: int = 0,
    world: int = 1,
    group: Group = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Loss and retrieval metrics of the whole set of N pairs (the same features on every rank).

    Pair i's rank is the number of candidates scoring strictly higher than its true partner, so
    ties cannot make the result depend on row order.  The loss is the contrastive loss with all
    N-1 other pairs as negatives (InfoNCE, or SigLIP's sigmoid loss when the model has a logit
    bias), so it does not depend on batch size or world size.  Ranks split the rows; the loss
    sums are all-reduced and the per-pair ranks all-gathered.
    """
    n, device = image_features.shape[0], image_features.device
    dist_on = _distributed(world)
    per_rank = math.ceil(n / world) if dist_on else n
    lo = rank * per_rank if dist_on else 0
    hi = min(n, lo + per_rank)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=device).reshape(())
    bias = (
        None
        if logit_bias is None
        else torch.as_tensor(logit_bias, dtype=torch.float32, device=device).reshape(())
    )
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    blocks: dict[str, list[Tensor]] = {"image_to_text": [], "text_to_image": []}
    for start in range(lo, hi, chunk_size):
        stop = min(hi, start + chunk_size)
        rows = torch.arange(stop - start, device=device)
        for name, queries, candidates in (
            ("image_to_text", image_features, text_features),
            ("text_to_image", text_features, image_features),
        ):
            logits = scale * (queries[start:stop] @ candidates.T)
            if bias is not None:
                logits = logits + bias
            true = logits[rows, rows + start]
            blocks[name].append((logits > true[:, None]).sum(dim=1))
            if bias is None:
                loss_sum += (torch.logsumexp(logits, dim=1) - true).double().sum()
            elif name == "image_to_text":  # the sigmoid loss is symmetric: score each pair once
                loss_sum -= (
                    F.logsigmoid(-logits).sum() - F.logsigmoid(-true).sum() + F.logsigmoid(true).sum()
                ).double()
    local_ranks = {
        k: torch.cat(v) if v else torch.zeros(0, dtype=torch.long, device=device) for k, v in blocks.items()
    }
    if dist_on:
        dist.all_reduce(loss_sum, group=group)
        local_ranks = {k: gather_rows(v, world, group) for k, v in local_ranks.items()}
    loss = loss_sum.item() / (2 * n if bias is None else n)
    out = {"loss": loss, "num_samples": float(n)}
    for name, ranks in local_ranks.items():
        out.update(_rank_summary(name, ranks))
    return out


def _rank_summary(prefix: str, ranks: Tensor) -> dict[str, float]:
    """open_clip's names: ``{prefix}_mean_rank``, ``_median_rank`` (1-based, median floored),
    ``_R@k``.  The median of an even count averages the middle two, as numpy's does."""
    ordered = ranks.double().sort().values
    n = len(ordered)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    out = {
        f"{prefix}_mean_rank": ordered.mean().item() + 1,
        f"{prefix}_median_rank": float(math.floor(median) + 1),
    }
    for k in RECALL_AT:
        out[f"{prefix}_R@{k}"] = (ranks < k).double().mean().item()
    return out


def evaluate_retrieval(
    model: nn.Module,
    source: Any,
    rank: int,
    world: int,
    group: Group,
    device: torch.device,
    dummy: dict[str, Tensor],
) -> dict[str, float]:
    """Validation loss and image<->text retrieval over the whole of ``source`` (a data source whose
    ``batches(0)`` yields this rank's ``image``/``text``/``keys`` batches).  Samples seen twice
    (a source that pads ranks by repeating) are counted once, by key."""
    emb = embed_pairs(model, source.batches(0), world, group, device, dummy)
    image = gather_rows(emb["image"], world, group)
    text = gather_rows(emb["text"], world, group)
    keys = emb["keys"]
    if _distributed(world):
        all_keys: list[Any] = [None] * world
        dist.all_gather_object(all_keys, keys, group=group)
        keys = None if any(k is None for k in all_keys) else [k for part in all_keys for k in part]
    if keys is not None and len(keys) == len(image):
        keep = _first_occurrences(keys).to(image.device)
        image, text = image[keep], text[keep]
    if len(image) == 0:
        raise RuntimeError("the validation set yielded no samples")
    return retrieval_metrics(image, text, emb["logit_scale"], emb["logit_bias"], rank, world, group)


# ---------------------------------------------------------------- the trainer's entry point


class Evaluator:
    """What to evaluate and when.  Built once per run; ``should_run`` decides, ``run`` evaluates.

    Schedule: a baseline before step 0 (``--baseline-eval``); after epoch ``e`` (1-based count
    of completed epochs) zero-shot when ``e % --zeroshot-frequency == 0`` and validation when
    ``e % --val-frequency == 0``; both every ``--eval-every-n-steps`` optimizer steps.  A step
    is evaluated at most once, so an epoch end that falls on a step-based eval is not repeated.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer: Callable,
        preprocess_val: Callable,
        image_size: tuple[int, int] | int,
        rank: int,
        world: int,
        group: Group,
        device: torch.device | str,
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.rank, self.world, self.group, self.device = rank, world, group, torch.device(device)
        self.batch_size = cfg.optim.batch_size
        self.workers = cfg.data.workers
        self.datasets = load_zeroshot_datasets(
            cfg.eval.zeroshot_data,
            cfg.eval.imagenet_val,
            preprocess_val,
            self.image_size,
            cfg.data.allow_pipe_urls,
            cfg.data.s3_endpoint_url,
            cfg.data.max_image_pixels,
        )
        from .data import build_source

        try:
            self.val_source = build_source(
                cfg, "val", preprocess_val, tokenizer, self.image_size, rank, world
            )
        except ValueError as e:  # e.g. fewer validation samples than one global batch
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"validation data: {e}") from None
        self._plan: tuple[int, bool, bool] | None = None
        self._last_step: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.datasets) or self.val_source is not None

    def should_run(self, epoch_end: bool, epoch: int, step: int) -> bool:
        """Whether an evaluation is due now.  ``epoch`` is the number of completed epochs when
        ``epoch_end`` is True; ``step`` counts optimizer steps done."""
        if not self.enabled or step == self._last_step:
            return False
        e = self.cfg.eval
        zs, val = bool(self.datasets), self.val_source is not None
        if epoch_end:
            zs = zs and e.zeroshot_frequency > 0 and epoch % e.zeroshot_frequency == 0
            val = val and e.val_frequency > 0 and epoch % e.val_frequency == 0
        elif step == 0:
            zs, val = zs and e.baseline_eval, val and e.baseline_eval
        elif not (e.eval_every_n_steps > 0 and step % e.eval_every_n_steps == 0):
            zs = val = False
        self._plan = (step, zs, val)
        return zs or val

    def run(self, model: nn.Module, step: int, epoch: int) -> dict[str, float]:
        """Evaluate what the last ``should_run`` for this step decided (everything configured
        when called without one).  Collective: every rank must call it."""
        if not self.enabled:
            return {}
        if self._plan is not None and self._plan[0] == step:
            _, zs, val = self._plan
        else:
            zs = val = True
        self._plan, self._last_step = None, step
        return self.evaluate(model, zeroshot=zs, val=val)

    def evaluate(self, model: nn.Module, zeroshot: bool = True, val: bool = True) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if zeroshot:
            top1s = []
            for ds in self.datasets:
                classifier = zeroshot_classifier(
                    model,
                    self.tokenizer,
                    ds.classnames,
                    ds.templates,
                    self.device,
                    self.rank,
                    self.world,
                    self.group,
                    batch_size=max(self.batch_size, 256),
                )
                res = evaluate_zeroshot(
                    model, ds, classifier, self.rank, self.world, self.group, self.batch_size, self.workers
                )
                metrics.update({f"zeroshot/{ds.name}/{k}": v for k, v in res.items()})
                top1s.append(res["top1"])
            if len(top1s) > 1:
                metrics["zeroshot/mean_top1"] = sum(top1s) / len(top1s)
        if val and self.val_source is not None:
            dummy = {"image": torch.zeros(1, 3, *self.image_size), "text": self.tokenizer([""])}
            res = evaluate_retrieval(
                model, self.val_source, self.rank, self.world, self.group, self.device, dummy
            )
            metrics.update({f"val/{k}": v for k, v in res.items()})
        return metrics
