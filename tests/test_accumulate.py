"""Contrastive gradient accumulation: K micro batches give the gradient of one batch K times
larger, with all negatives, on 2 real ranks under ZeRO-2 and ZeRO-3 (fp32, tolerance 1e-5)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import run_ranks
from tests.launch import TINY

K, B = 2, 4  # micro batches per step, samples per micro batch


def _data(tokenizer, rank: int, world: int):
    from dsclip.data.synthetic import synthetic_sample

    micro = []
    for i in range(K):
        idx = range((rank * K + i) * B, (rank * K + i + 1) * B)
        imgs, caps = zip(*(synthetic_sample(0, j, (32, 32)) for j in idx))
        micro.append((torch.stack(imgs), tokenizer(list(caps))))
    return micro


def _model(siglip: bool):
    import open_clip

    from dsclip.model import promote_scalar_params

    open_clip.add_model_config(TINY)
    torch.manual_seed(0)
    extra = {"init_logit_bias": -2.0, "init_logit_scale": 1.0} if siglip else {}
    model = open_clip.create_model("tiny-clip", output_dict=True, **extra)
    promote_scalar_params(model)
    return model


def _loss(siglip: bool):
    from dsclip.loss import ClipLoss, SigLipLoss

    return SigLipLoss() if siglip else ClipLoss(local_loss=True, gather_with_grad=True)


def _call(loss_fn, out):
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))


CASES = [("clip", 2), ("clip", 3), ("siglip", 3)]


def _accumulated_grads(rank: int, world: int) -> dict[tuple[str, int], dict[str, dict]]:
    """Every case in the same two ranks (a process start costs more than a tiny model's steps)."""
    return {(loss, stage): {mode: _grads_for(rank, world, stage, mode, loss == "siglip")
                            for mode in ("contrastive", "plain")}
            for loss, stage in CASES}


def _grads_for(rank: int, world: int, stage: int, mode: str, siglip: bool):
    import deepspeed
    import open_clip
    from deepspeed.utils import safe_get_full_grad

    from dsclip.accumulate import contrastive_step
    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world)})
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model = _model(siglip)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = {"train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": K, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    micro = _data(open_clip.get_tokenizer("tiny-clip"), rank, world)
    grads = {}

    def read_grads():
        for name, p in engine.module.named_parameters():
            g = safe_get_full_grad(p)
            grads[name] = None if g is None else g.detach().clone().reshape(p.ds_shape if hasattr(p, "ds_shape")
                                                                              else p.shape)

    loss_fn = _loss(siglip)
    if mode == "contrastive":
        contrastive_step(engine, loss_fn, micro, before_last_step=read_grads)
    else:  # plain accumulation, for contrast: its gradient is NOT the big batch's
        for i, (img, txt) in enumerate(micro):
            out = engine(image=img, text=txt)
            engine.backward(_call(loss_fn, out))
            if i == K - 1:
                read_grads()
            engine.step()
    return grads


def _reference_grads(world: int, siglip: bool):
    """Single process: the global loss over the whole concatenated big batch."""
    import open_clip

    model = _model(siglip)
    tok = open_clip.get_tokenizer("tiny-clip")
    parts = [m for r in range(world) for m in _data(tok, r, world)]
    img, txt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    out = model(image=img, text=txt)
    _call(_loss(siglip), out).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def accumulated():
    return run_ranks(_accumulated_grads, 2, timeout=600)[0]


@pytest.mark.dist
@pytest.mark.parametrize("loss,stage", CASES)
def test_contrastive_accumulation_equals_big_batch(accumulated, loss, stage):
    """Also the distributed losses' exactness under ZeRO: DeepSpeed's averaged gradient equals the
    single-process global loss's, for InfoNCE (ZeRO-2 and 3) and SigLIP (ZeRO-3)."""
    siglip = loss == "siglip"
    ref = _reference_grads(2, siglip)
    both = accumulated[loss, stage]
    got, plain = both["contrastive"], both["plain"]
    assert got.keys() == ref.keys()
    worst = max(float((got[n] - ref[n]).abs().max()) for n in ref)
    assert worst < 1e-5, worst
    assert max(float((plain[n] - ref[n]).abs().max()) for n in ref) > 1e-4  # the test can tell them apart
