"""Contrastive losses: the gathered CLIP (InfoNCE) loss and SigLIP's sigmoid loss.

Both take the process group as an argument and fall back to the plain single-process loss when
no group is initialised, so tests and evaluation call them directly.  Every rank must hold the
same local batch size (the all-gather and the label offsets assume it).

Gradient convention: with ``local_loss`` each rank returns the mean over its *own* rows, and
the all-gather backward sums what every rank's loss sends back to a feature.  Rank r's feature
gradient is therefore ``world * d(global loss)/d(features_r)``; DeepSpeed/DDP then average the
parameter gradients over ranks, which recovers exactly the gradient of the global loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

Group = dist.ProcessGroup | None
Scalar = Tensor | float


def _rank_world(group: Group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _global_rank(group: Group, group_rank: int) -> int:
    # P2P ops address peers by global rank, even inside a sub-group.
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward reduce-scatters (sums) the gradient.

    Every rank's loss may depend on every rank's rows, so a rank's slice of the gradient is the
    sum of what all ranks computed for it.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: Group) -> Tensor:
        ctx.group = group
        ctx.rank, world = _rank_world(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        _, world = _rank_world(ctx.group)
        parts = [p.contiguous() for p in grad.chunk(world, dim=0)]
        out = torch.empty_like(parts[ctx.rank])
        dist.reduce_scatter(out, parts, group=ctx.group)
        return out, None


def gather_features(x: Tensor, group: Group = None, with_grad: bool = True) -> Tensor:
    """Concatenate ``x`` from every rank of ``group`` along dim 0 (rank order).

    ``with_grad=False`` gathers without autograd but puts the local tensor back in its slot, so
    the local rows still receive gradients (the other ranks' rows are constants).
    """
    rank, world = _rank_world(group)
    if world == 1:
        return x
    if with_grad:
        return _AllGatherWithGrad.apply(x, group)
    parts = [torch.empty_like(x) for _ in range(world)]
    with torch.no_grad():
        dist.all_gather(parts, x.contiguous(), group=group)
    parts[rank] = x
    return torch.cat(parts, dim=0)


def _upcast(x: Tensor) -> Tensor:
    # bf16/fp16 features are scored in fp32 (a B-term logsumexp in bf16 loses ~3 digits);
    # fp32/fp64 inputs keep their precision.
    return x.float() if x.element_size() < 4 else x


def _no_autocast(x: Tensor) -> torch.autocast:
    # Under torch.autocast the matmuls would run in bf16/fp16 whatever the inputs' dtype.
    return torch.autocast(x.device.type, enabled=False)


def _as_scalar(value: Scalar | None, dtype: torch.dtype) -> Scalar | None:
    # open_clip returns logit_scale/bias as 0-dim or shape-[1] tensors; a 0-dim view keeps the
    # logits' shape [b, B] either way and autograd reshapes the gradient back.
    if isinstance(value, Tensor):
        return value.to(dtype).reshape(())
    return value


def _scaled_logits(rows: Tensor, cols: Tensor, scale: Scalar, bias: Scalar | None) -> Tensor:
    logits = scale * (rows @ cols.T)
    return logits if bias is None else logits + bias


class _FusedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``scale * rows @ cols.T`` against ``labels``, one direction.

    The gradients are computed during the forward, ``chunk`` rows at a time, and only they are
    kept (b x d and B x d); each chunk's ``chunk x B`` logits buffer is reused in place for the
    softmax and its gradient and then dropped.  Peak loss memory is one chunk of logits instead
    of the several b x B tensors autograd would save (logits, log-softmax, their gradients).
    """

    @staticmethod
    def forward(ctx: Any, rows: Tensor, cols: Tensor, scale: Tensor, labels: Tensor, chunk: int, grad: bool):
        total = rows.new_zeros(())
        if grad:
            grad_rows, grad_cols, grad_scale = (
                torch.empty_like(rows),
                torch.zeros_like(cols),
                rows.new_zeros(()),
            )
        for start in range(0, rows.shape[0], chunk):
            r, y = rows[start : start + chunk], labels[start : start + chunk]
            logits = (r * scale) @ cols.T
            positives = logits.gather(1, y[:, None])
            peak = logits.amax(dim=1, keepdim=True)
            norm = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)  # logits now hold exp(x - max)
            total += (norm.log() + peak - positives).sum()
            if grad:
                probs = logits.div_(norm)  # softmax
                probs[torch.arange(len(y), device=y.device), y] -= 1  # d(loss)/d(logits) = softmax - onehot
                d_rows = probs @ cols
                grad_rows[start : start + chunk] = d_rows * scale
                grad_cols.addmm_(probs.T, r * scale)
                grad_scale += (d_rows * r).sum()  # sum(dlogits * rows @ cols.T) without the b x B product
        if grad:
            ctx.save_for_backward(grad_rows, grad_cols, grad_scale)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor):
        grad_rows, grad_cols, grad_scale = ctx.saved_tensors
        return grad_rows * grad_out, grad_cols * grad_out, grad_scale * grad_out, None, None, None


class ClipLoss(nn.Module):
    """InfoNCE: mean of the image->text and text->image cross-entropies (open_clip's ClipLoss).

    ``local_loss``: each rank scores only its own rows against all gathered features, so its
    logits are ``b x B`` instead of ``B x B``.  ``chunk_size`` bounds that further to
    ``chunk_size x B`` rows at a time (same result; smaller matmuls).  The logits are fp32 even
    for bf16 features.  Double backward is not supported.
    """

    def __init__(
        self,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        chunk_size: int | None = None,
        group: Group = None,
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.chunk_size = chunk_size
        self.group = group
        self._labels: dict[tuple[int, int, torch.device], Tensor] = {}

    def labels(self, num_rows: int, rank: int, device: torch.device) -> Tensor:
        """Target column of each scored row: ``arange(b) + b * rank`` (cached)."""
        key = (num_rows, rank, device)
        if key not in self._labels:
            self._labels[key] = torch.arange(num_rows, device=device) + num_rows * rank
        return self._labels[key]

    def _rows_and_cols(
        self, image_features: Tensor, text_features: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Upcast (image rows, text rows, all images, all texts, label offset in row blocks)."""
        rank, world = _rank_world(self.group)
        if world == 1:
            images, texts = _upcast(image_features), _upcast(text_features)
            return images, texts, images, texts, 0
        # Gather in the input dtype (half the traffic for bf16), upcast afterwards.
        all_image = _upcast(gather_features(image_features, self.group, self.gather_with_grad))
        all_text = _upcast(gather_features(text_features, self.group, self.gather_with_grad))
        if self.local_loss:
            return _upcast(image_features), _upcast(text_features), all_image, all_text, rank
        return all_image, all_text, all_image, all_text, 0

    def logits(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar | None = None,
    ) -> tuple[Tensor, Tensor]:
        """fp32 ``(logits_per_image, logits_per_text)`` for the rows this rank scores."""
        img_rows, txt_rows, all_image, all_text, _ = self._rows_and_cols(image_features, text_features)
        scale, bias = _as_scalar(logit_scale, img_rows.dtype), _as_scalar(logit_bias, img_rows.dtype)
        with _no_autocast(img_rows):
            per_image = _scaled_logits(img_rows, all_text, scale, bias)
            per_text = _scaled_logits(txt_rows, all_image, scale, bias)
        return per_image, per_text

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar | None = None,
    ) -> Tensor:
        img_rows, txt_rows, all_image, all_text, offset = self._rows_and_cols(image_features, text_features)
        scale = _as_scalar(logit_scale, img_rows.dtype)
        if not isinstance(scale, Tensor):
            scale = torch.tensor(float(scale), dtype=img_rows.dtype, device=img_rows.device)
        n = img_rows.shape[0]
        labels = self.labels(n, offset, img_rows.device)
        chunk = self.chunk_size or n
        grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (img_rows, txt_rows, all_image, all_text, scale)
        )
        with _no_autocast(img_rows):
            i2t = _FusedCrossEntropy.apply(img_rows, all_text, scale, labels, chunk, grad)
            t2i = _FusedCrossEntropy.apply(txt_rows, all_image, scale, labels, chunk, grad)
        loss = (i2t + t2i) / (2 * n)
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            # Softmax is shift-invariant, so a bias shared by all logits cancels out of InfoNCE:
            # its gradient is exactly zero.  Keep it in the graph so it still gets a (zero) grad.
            loss = loss + 0.0 * logit_bias.sum()
        return loss


class _Exchange(torch.autograd.Function):
    """Send ``tensors[k]`` to ``dsts[k]`` and receive output k from ``srcs[k]`` (global ranks).

    The backward runs the same exchange reversed, returning each received tensor's gradient to
    the rank that sent it; every rank must therefore call backward too.
    """

    @staticmethod
    def forward(ctx: Any, group: Group, dsts: tuple[int, ...], srcs: tuple[int, ...], *tensors: Tensor):
        ctx.group, ctx.dsts, ctx.srcs = group, dsts, srcs
        return _p2p(group, dsts, srcs, tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor):
        return (None, None, None) + _Exchange.apply(ctx.group, ctx.srcs, ctx.dsts, *grads)


def _p2p(group: Group, dsts: tuple[int, ...], srcs: tuple[int, ...], tensors: tuple[Tensor, ...]):
    tensors = tuple(t.contiguous() for t in tensors)
    received = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t, d, group=group) for t, d in zip(tensors, dsts)]
    ops += [dist.P2POp(dist.irecv, r, s, group=group) for r, s in zip(received, srcs)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP): every image-text pair is a binary positive/negative decision.

    Rank r scores its images against its own texts (positives on the diagonal) and, as
    negatives, against every other rank's texts, which travel around the ring by neighbour
    exchange; the sum is divided by the local batch, as in open_clip.  ``bidirectional`` passes
    texts both ways at once, halving the number of exchange rounds.
    """

    def __init__(self, group: Group = None, bidirectional: bool = True) -> None:
        super().__init__()
        self.group = group
        self.bidirectional = bidirectional
        self._signs: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def _signs_for(self, images: Tensor) -> Tensor:
        """+1 on the diagonal (the positive pairs), -1 elsewhere (cached)."""
        key = (len(images), images.device, images.dtype)
        if key not in self._signs:
            self._signs[key] = 2 * torch.eye(len(images), device=images.device, dtype=images.dtype) - 1
        return self._signs[key]

    def _pair_loss(
        self, images: Tensor, texts: Tensor, scale: Scalar, bias: Scalar, positives: bool
    ) -> Tensor:
        with _no_autocast(images):
            logits = _scaled_logits(images, _upcast(texts), scale, bias)
        signed = logits * self._signs_for(images) if positives else -logits
        return -F.logsigmoid(signed).sum()

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar | None,
    ) -> Tensor:
        images = _upcast(image_features)
        scale, bias = _as_scalar(logit_scale, images.dtype), _as_scalar(logit_bias, images.dtype)
        total = self._pair_loss(images, text_features, scale, bias, positives=True)
        rank, world = _rank_world(self.group)
        if world > 1:
            right = _global_rank(self.group, (rank + 1) % world)
            left = _global_rank(self.group, (rank - 1) % world)
            # Texts stay in their input dtype on the wire; _pair_loss upcasts them.
            to_left = to_right = text_features
            rounds, odd = divmod(world - 1, 2) if self.bidirectional else (0, world - 1)
            for _ in range(rounds):
                from_right, from_left = _Exchange.apply(
                    self.group, (left, right), (right, left), to_left, to_right
                )
                for texts in (from_right, from_left):
                    total = total + self._pair_loss(images, texts, scale, bias, positives=False)
                to_left, to_right = from_right, from_left
            for _ in range(odd):
                # Ring shift: pass to the right, receive from the left.
                (to_right,) = _Exchange.apply(self.group, (right,), (left,), to_right)
                total = total + self._pair_loss(images, to_right, scale, bias, positives=False)
        return total / images.shape[0]


def build_loss(cfg_loss: Any, group: Group = None) -> nn.Module:
    """Loss from a config with ``local_loss``, ``gather_with_grad``, ``siglip``, ``loss_chunk_size``.

    SigLIP always exchanges texts between neighbours, so the three CLIP options do not apply to it.
    """
    if cfg_loss.siglip:
        return SigLipLoss(group=group)
    return ClipLoss(
        local_loss=cfg_loss.local_loss,
        gather_with_grad=cfg_loss.gather_with_grad,
        chunk_size=cfg_loss.loss_chunk_size,
        group=group,
    )
