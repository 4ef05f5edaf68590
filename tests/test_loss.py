"""dsclip.loss against a plain global reference and against open_clip's own losses.

Gradient bookkeeping for the multi-rank checks (N ranks, b rows each, B = N*b): rank r's loss
L_r is the mean over its own rows, and the global loss is L = mean_r L_r.  The all-gather (or
neighbour exchange) backward sums every rank's contribution, so rank r's *feature* gradient is
d(sum_s L_s)/dx_r = N * dL/dx_r.  Parameters shared by all ranks (logit_scale, logit_bias) get
dL_r/ds on rank r, and DDP/DeepSpeed's gradient averaging makes mean_r dL_r/ds = dL/ds.  So we
check: mean of rank losses == L, rank feature grad / N == global grad rows, mean of rank
scale/bias grads == global scale/bias grad.  All comparisons are fp32 at atol=rtol=1e-6.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsclip.loss import ClipLoss, SigLipLoss, build_loss, gather_features
from tests.distributed import run_ranks


def _load_open_clip_loss():
    """open_clip's loss module on its own.

    It imports only torch, while importing the open_clip package pulls in timm and torchvision:
    about 2 s of CPU in each spawned rank, on a machine shared by many test runs.
    """
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    path = Path(spec.origin).parent / "loss.py"
    loss_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


oc_loss = _load_open_clip_loss()
B_LOCAL, DIM = 4, 8
TOL = {"atol": 1e-6, "rtol": 1e-6}

torch.set_num_threads(1)


def _batch(
    world: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(world * B_LOCAL, DIM, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(world * B_LOCAL, DIM, generator=gen, dtype=torch.float64), dim=-1)
    return img.to(dtype), txt.to(dtype)


def ref_clip(img, txt, scale, bias=None):
    logits = scale * img @ txt.T
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def ref_siglip(img, txt, scale, bias):
    logits = scale * img @ txt.T + bias
    signs = 2 * torch.eye(len(img), dtype=img.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / len(img)


def _run(loss_fn, img, txt, scale, bias=None, **kw):
    """Loss value and grads w.r.t. (img, txt, scale[, bias]) as detached tensors."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (img, txt, scale)]
    if bias is not None:
        leaves.append(bias.detach().clone().requires_grad_(True))
    loss = loss_fn(*leaves[:3], *leaves[3:], **kw)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype).reshape(g.shape), **TOL)


# ----------------------------------------------------------------------------- single process


@pytest.mark.parametrize("scale_shape", [(), (1,)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_single_process_matches_reference_and_open_clip(scale_shape, with_bias):
    img, txt = _batch(2)
    scale = torch.full(scale_shape, 14.3)
    bias = torch.full(scale_shape, -2.0) if with_bias else None
    got = _run(ClipLoss(), img, txt, scale, bias)
    _close(
        got,
        _run(ref_clip, img.double(), txt.double(), scale.double(), None if bias is None else bias.double()),
    )
    _close(got, _run(oc_loss.ClipLoss(), img, txt, scale, bias))
    assert got[3].shape == scale.shape


@pytest.mark.parametrize("siglip", [False, True])
def test_float64_inputs_stay_float64_and_match_reference(siglip):
    """fp64 inputs are scored in fp64, so the fused gradients are exact far below 1e-6."""
    gen = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(64, 32, generator=gen, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(64, 32, generator=gen, dtype=torch.float64), dim=-1)
    scale, bias = torch.tensor(30.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    ours, ref = (SigLipLoss(), ref_siglip) if siglip else (ClipLoss(chunk_size=24), ref_clip)
    got, want = _run(ours, img, txt, scale, bias), _run(ref, img, txt, scale, bias)
    assert all(g.dtype == torch.float64 for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_clip_larger_batch_matches_open_clip():
    gen = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(96, 64, generator=gen), dim=-1)
    txt = F.normalize(torch.randn(96, 64, generator=gen), dim=-1)
    scale = torch.tensor([100.0])  # open_clip's clamp value: the sharpest softmax in practice
    _close(_run(ClipLoss(), img, txt, scale), _run(oc_loss.ClipLoss(), img, txt, scale))


@pytest.mark.parametrize("chunk", [1, 3, 5, 8, 100])
def test_clip_chunked_equals_unchunked(chunk):
    img, txt = _batch(2)
    scale, bias = torch.tensor(10.0), torch.tensor(0.5)
    _close(_run(ClipLoss(chunk_size=chunk), img, txt, scale, bias), _run(ClipLoss(), img, txt, scale, bias))


def test_clip_bf16_features_give_fp32_logits():
    img, txt = _batch(2, torch.bfloat16)
    scale = torch.tensor([14.3])
    loss_fn = ClipLoss()
    per_image, per_text = loss_fn.logits(img, txt, scale)
    assert per_image.dtype == per_text.dtype == torch.float32
    upcast = loss_fn(img.float(), txt.float(), scale)
    assert loss_fn(img, txt, scale).dtype == torch.float32
    assert torch.equal(loss_fn(img, txt, scale), upcast)
    assert torch.equal(
        ClipLoss(chunk_size=3)(img, txt, scale), ClipLoss(chunk_size=3)(img.float(), txt.float(), scale)
    )


def test_logits_stay_fp32_under_autocast():
    img, txt = _batch(2)
    scale, bias = torch.tensor(14.3), torch.tensor(-3.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(img, txt.T).dtype == torch.bfloat16  # autocast is really on
        per_image, _ = ClipLoss().logits(img, txt, scale)
        clip, siglip = ClipLoss()(img, txt, scale), SigLipLoss()(img, txt, scale, bias)
    assert per_image.dtype == torch.float32
    assert torch.equal(clip, ClipLoss()(img, txt, scale))
    assert torch.equal(siglip, SigLipLoss()(img, txt, scale, bias))


def test_labels_are_cached():
    loss_fn = ClipLoss()
    a = loss_fn.labels(4, 1, torch.device("cpu"))
    assert a is loss_fn.labels(4, 1, torch.device("cpu"))
    assert a.tolist() == [4, 5, 6, 7]
    assert loss_fn.labels(4, 0, torch.device("cpu")) is not a


def test_siglip_single_process_matches_reference_and_open_clip():
    img, txt = _batch(2)
    scale, bias = torch.tensor(10.0), torch.tensor([-10.0])
    got = _run(SigLipLoss(), img, txt, scale, bias)
    _close(got, _run(ref_siglip, img.double(), txt.double(), scale.double(), bias.double()))
    _close(got, _run(oc_loss.SigLipLoss(), img, txt, scale, bias))


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2)
    assert gather_features(x) is x and gather_features(x, with_grad=False) is x


def test_build_loss_reads_config_attributes():
    cfg = SimpleNamespace(local_loss=False, gather_with_grad=False, siglip=False, loss_chunk_size=16)
    loss_fn = build_loss(cfg)
    assert isinstance(loss_fn, ClipLoss)
    assert (loss_fn.local_loss, loss_fn.gather_with_grad, loss_fn.chunk_size) == (False, False, 16)
    assert isinstance(build_loss(SimpleNamespace(**{**vars(cfg), "siglip": True})), SigLipLoss)


def test_invalid_chunk_size():
    with pytest.raises(ValueError):
        ClipLoss(chunk_size=0)


# ----------------------------------------------------------------------------- real gloo ranks


def _rank_checks(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    """Every multi-rank variant in one process group, so each world size spawns once."""
    img, txt = _batch(world)
    rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    img, txt = img[rows], txt[rows]
    # Mix the two logit_scale layouts open_clip produces across ranks.
    scale = torch.tensor(14.3) if rank % 2 == 0 else torch.tensor([14.3])
    bias = torch.tensor([-10.0])
    out = {
        "clip": _run(ClipLoss(), img, txt, scale),
        "clip_chunked": _run(ClipLoss(chunk_size=3), img, txt, scale),
        "clip_bias": _run(ClipLoss(), img, txt, scale, torch.tensor(-1.0)),
        "clip_nograd_gather": _run(ClipLoss(gather_with_grad=False), img, txt, scale),
        "clip_global": _run(ClipLoss(local_loss=False), img, txt, scale),
        "oc_clip": _run(oc_loss.ClipLoss(True, True, rank=rank, world_size=world), img, txt, scale),
        "oc_clip_global": _run(oc_loss.ClipLoss(False, True, rank=rank, world_size=world), img, txt, scale),
        "siglip": _run(SigLipLoss(), img, txt, torch.tensor(10.0), bias),
        "siglip_ring": _run(SigLipLoss(bidirectional=False), img, txt, torch.tensor(10.0), bias),
        "oc_siglip": _run(
            oc_loss.SigLipLoss(rank=rank, world_size=world), img, txt, torch.tensor(10.0), bias
        ),
    }
    bf_img, bf_txt = img.bfloat16(), txt.bfloat16()
    logits = ClipLoss().logits(bf_img, bf_txt, scale)
    siglip_args = (torch.tensor(10.0), bias)
    out["bf16"] = [
        ClipLoss()(bf_img, bf_txt, scale).detach(),
        ClipLoss()(bf_img.float(), bf_txt.float(), scale).detach(),
        SigLipLoss()(bf_img, bf_txt, *siglip_args).detach(),
        SigLipLoss()(bf_img.float(), bf_txt.float(), *siglip_args).detach(),
        torch.tensor([logits[0].dtype == torch.float32, logits[0].shape == (B_LOCAL, world * B_LOCAL)]),
    ]
    if world == 4:
        # Sub-groups {0, 1} and {2, 3}: every rank creates every group, in the same order.
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        group = groups[rank // 2]
        out["clip_subgroup"] = _run(ClipLoss(group=group), img, txt, scale)
        out["siglip_subgroup"] = _run(SigLipLoss(group=group), img, txt, torch.tensor(10.0), bias)
    return out


@functools.cache
def _dist_results(world: int) -> list[dict[str, list[torch.Tensor]]]:
    return run_ranks(_rank_checks, world, timeout=120)


def _check_against_global(results, key, ref_fn, scale, bias=None, ranks_used=None):
    """The per-rank results recombine into the global loss (see module docstring).

    ``ranks_used`` restricts the check to a sub-group's ranks (and their rows of the batch).
    """
    ranks_used = list(range(len(results))) if ranks_used is None else ranks_used
    world = len(ranks_used)
    img, txt = (
        t.reshape(len(results), B_LOCAL, DIM)[ranks_used].reshape(-1, DIM) for t in _batch(len(results))
    )
    results = [results[r] for r in ranks_used]
    for dtype in (torch.float64, torch.float32):
        args = [img.to(dtype), txt.to(dtype), scale.to(dtype)] + ([] if bias is None else [bias.to(dtype)])
        want = _run(ref_fn, *args)
        ranks = [r[key] for r in results]
        _close([torch.stack([r[0] for r in ranks]).mean()], [want[0]])
        for i in (1, 2):  # image / text feature grads: rank slice times world
            _close([torch.cat([r[i] for r in ranks]) / world], [want[i]])
        for i in range(3, len(want)):  # shared scalars: averaged across ranks
            _close([torch.stack([r[i].reshape(()) for r in ranks]).mean()], [want[i]])


WORLDS = [1, 2, 4]


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
def test_dist_clip_local_loss_equals_global(world):
    results = _dist_results(world)
    _check_against_global(results, "clip", ref_clip, torch.tensor(14.3))
    _check_against_global(results, "clip_bias", ref_clip, torch.tensor(14.3), torch.tensor(-1.0))
    for r in results:
        assert r["clip"][3].shape == r["clip_bias"][3].shape  # 0-dim and [1] scales both kept


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
def test_dist_clip_chunked_equals_unchunked(world):
    for r in _dist_results(world):
        _close(r["clip_chunked"], r["clip"])


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
def test_dist_clip_matches_open_clip(world):
    for r in _dist_results(world):
        _close(r["clip"], r["oc_clip"])
        _close(r["clip_global"], r["oc_clip_global"])


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
def test_dist_clip_gather_without_grad(world):
    for r in _dist_results(world):
        value, img_grad, txt_grad, _ = r["clip_nograd_gather"]
        _close([value], [r["clip"][0]])  # same forward; only the gradient path differs
        assert img_grad.abs().sum() > 0 and txt_grad.abs().sum() > 0


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
def test_dist_siglip_equals_global_and_open_clip(world):
    results = _dist_results(world)
    for key in ("siglip", "siglip_ring"):
        _check_against_global(results, key, ref_siglip, torch.tensor(10.0), torch.tensor([-10.0]))
    for r in results:
        _close(r["siglip"], r["oc_siglip"])
        _close(r["siglip_ring"], r["oc_siglip"])


@pytest.mark.dist
@pytest.mark.parametrize("world", WORLDS)
def test_dist_bf16_logits_are_fp32(world):
    for r in _dist_results(world):
        clip_bf16, clip_upcast, siglip_bf16, siglip_upcast, flags = r["bf16"]
        assert flags.all()
        assert torch.equal(clip_bf16, clip_upcast)
        assert torch.equal(siglip_bf16, siglip_upcast)  # bf16 texts travel the ring intact


@pytest.mark.dist
def test_dist_subgroups_are_independent():
    """Two 2-rank sub-groups of a 4-rank world each reproduce their own global loss."""
    results = _dist_results(4)
    for ranks_used in ([0, 1], [2, 3]):
        _check_against_global(results, "clip_subgroup", ref_clip, torch.tensor(14.3), ranks_used=ranks_used)
        _check_against_global(
            results, "siglip_subgroup", ref_siglip, torch.tensor(10.0), torch.tensor([-10.0]), ranks_used
        )
