"""One optimizer step over K micro batches, in two flavours.

``plain``: DeepSpeed's gradient accumulation.  Each micro batch's loss sees only its own
negatives, so for a contrastive loss K micro batches of b are *not* one batch of K*b.

``contrastive`` (GradCache-style, as open_clip's ``--accum-freq`` does it): embed all K micro
batches without gradients, compute the loss once over the cached features (every negative of the
big batch, gathered across ranks), then replay each micro batch with gradients and push the
cached feature gradients through it.  The gradient equals that of one batch K times larger.
Each replay restores the RNG state of its caching pass, so dropout and patch dropout draw the
same masks both times.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Inputs = tuple[torch.Tensor, torch.Tensor]


def _loss_of(loss_fn, out: dict) -> torch.Tensor:
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))


def plain_step(engine, loss_fn, micro: list[Inputs]) -> float:
    total = 0.0
    for images, texts in micro:
        loss = _loss_of(loss_fn, engine(image=images, text=texts))
        engine.backward(loss)
        engine.step()
        total += float(loss.detach())
    return total / len(micro)


def _rng() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def contrastive_step(engine, loss_fn, micro: list[Inputs],
                     before_last_step: Callable[[], None] | None = None) -> float:
    """Returns the big-batch loss.  ``before_last_step`` runs after the last backward and before
    the optimizer step (tests read the reduced gradients there)."""
    if len(micro) == 1:
        return plain_step(engine, loss_fn, micro)
    # 1. cache features without building any graph
    cached, states = [], []
    with torch.no_grad():
        for images, texts in micro:
            states.append(_rng())
            cached.append(engine(image=images, text=texts))
    after = _rng()
    # 2. the loss over all cached features, differentiated w.r.t. the features themselves
    img = torch.cat([c["image_features"] for c in cached]).detach().requires_grad_(True)
    txt = torch.cat([c["text_features"] for c in cached]).detach().requires_grad_(True)
    scale = cached[0]["logit_scale"].detach().requires_grad_(True)
    bias = cached[0].get("logit_bias")
    bias = bias.detach().requires_grad_(True) if bias is not None else None
    loss = loss_fn(img, txt, scale, bias)
    leaves = [img, txt, scale] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(loss, leaves)
    g_img, g_txt = grads[0].split([len(c["image_features"]) for c in cached]), \
        grads[1].split([len(c["text_features"]) for c in cached])
    # 3. replay each micro batch with gradients: d(sum(f * g))/dθ = g · df/dθ
    for i, (images, texts) in enumerate(micro):
        _set_rng(states[i])
        out = engine(image=images, text=texts)
        surrogate = (out["image_features"] * g_img[i]).sum() + (out["text_features"] * g_txt[i]).sum()
        if i == 0:  # the scale (and bias) enter the loss once
            surrogate = surrogate + (out["logit_scale"] * grads[2]).sum()
            if bias is not None:
                surrogate = surrogate + (out["logit_bias"] * grads[3]).sum()
        engine.backward(surrogate, scale_wrt_gas=False)  # already the big batch's gradient
        if i == len(micro) - 1 and before_last_step is not None:
            before_last_step()
        engine.step()
    _set_rng(after)
    return float(loss.detach())
