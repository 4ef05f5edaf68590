"""A checkpoint saved by 2 ranks resumes on 1 and on 4 ranks (``dsclip.reshard``: DeepSpeed
universal checkpoints) with the optimizer state intact.

The global batch stays 8 (2 x 4 -> 1 x 8 and 4 x 2), so the synthetic source hands out the same
samples per step on every world size and the resumed loss must continue the 2-rank trajectory.
Tolerances: the fp32 master weights and Adam moments after loading are compared exactly
(unsharding only moves numbers), the next losses within 1e-4 of the uninterrupted run's (a
different rank count sums the gathered loss in a different order; the observed gap is ~1e-7).
A reset optimizer would be off by far more: Adam's first steps move the loss by ~1e-2.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.distributed import run_ranks
from tests.launch import TINY, launch_train, tiny_args

pytestmark = [pytest.mark.faults, pytest.mark.dist]

GLOBAL_BATCH = 8
LOSS_TOL = 1e-4
NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval", "--report-to", ""]


# ---------------------------------------------------------------- engines driven directly


def _config(world: int):
    from dsclip.config import Config

    cfg = Config()
    cfg.model.model = TINY
    cfg.optim.batch_size = GLOBAL_BATCH // world
    cfg.optim.lr, cfg.optim.wd, cfg.run.precision = 1e-2, 0.1, "fp32"
    cfg.strategy.strategy = "partial"  # frozen parameters ride along in the checkpoint too
    cfg.strategy.partial_unlocked_image_groups = cfg.strategy.partial_unlocked_text_layers = 2
    cfg.explicit.add("optim.batch_size")
    return cfg


def _engine(rank: int, world: int, stage: int, resume: tuple[str, str] | None):
    import deepspeed

    from dsclip.engine import fill_ds_config, initialize_engine, load_ds_config
    from dsclip.loss import build_loss
    from dsclip.model import create_model
    from dsclip.reshard import merge_config, prepare_resume
    from dsclip.strategies import apply_strategy, param_groups_for

    os.environ.update({"LOCAL_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": str(world)})
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = _config(world)
    torch.manual_seed(0 if resume is None else 1)  # frozen weights must come from the checkpoint
    bundle = create_model(cfg)
    apply_strategy(bundle.model, cfg)
    ds = load_ds_config(None)
    ds["zero_optimization"] = {"stage": stage, "overlap_comm": False, "stage3_param_persistence_threshold": 0}
    ds = fill_ds_config(ds, cfg, world, "fp32")
    load = None
    if resume is not None:
        load_dir, load_tag, overrides = prepare_resume(*resume, world, rank)
        ds, load = merge_config(ds, overrides), (load_dir, load_tag)
    engine = initialize_engine(bundle.model, param_groups_for(bundle.model, cfg), ds, on_gpu=False)
    return engine, bundle, build_loss(cfg.loss), load


def _batch(bundle, step: int, rank: int, world: int):
    from dsclip.data.synthetic import synthetic_sample

    b = GLOBAL_BATCH // world
    first = step * GLOBAL_BATCH + rank * b
    images, captions = zip(*(synthetic_sample(0, i, bundle.image_size) for i in range(first, first + b)))
    return torch.stack(images), bundle.tokenizer(list(captions))


def _step(engine, bundle, loss_fn, step: int, rank: int, world: int) -> float:
    """One optimizer step; returns the global loss (the mean of the ranks' local losses)."""
    import torch.distributed as dist

    from dsclip.accumulate import plain_step

    local = plain_step(engine, loss_fn, [_batch(bundle, step, rank, world)])
    t = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every trainable parameter's fp32 master copy and Adam moments, unsharded (collective)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 link each parameter to its Adam moments once, after the first group's first
        # step, when the other groups have no state yet; link them all again before reading.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[name] = {"fp32": safe_get_full_fp32_param(p).clone(),
                         "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                         "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone()}
        else:  # under ZeRO-3 a frozen parameter is partitioned too
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                out[name] = {"frozen": p.detach().clone()}
    return out


def _group_settings(engine) -> list[tuple]:
    return [(g["name"], g["lr"], g["weight_decay"]) for g in engine.optimizer.optimizer.param_groups]


def _adam_steps(engine) -> list[float]:
    states = engine.optimizer.optimizer.state.values()
    return sorted({float(s["step"]) for s in states if "step" in s})


STAGES = (2, 3)  # both run in the same processes: starting a process costs more than a tiny model


def _train_and_save(rank: int, world: int, base: str) -> dict[int, dict]:
    from dsclip import checkpoint as ckpt

    out = {}
    for stage in STAGES:
        engine, bundle, loss_fn, _ = _engine(rank, world, stage, None)
        losses = [_step(engine, bundle, loss_fn, s, rank, world) for s in range(2)]
        meta = {"zero_stage": stage, "world_size": world, "param_shapes": {"logit_scale": []}}
        client = {"step": 2, "epoch": 0, "batch_in_epoch": 2, "samples_seen": 2 * GLOBAL_BATCH}
        ckpt.save_checkpoint(engine, os.path.join(base, f"zero{stage}"), 2, client, rank, keep_last_n=5, meta=meta)
        state = _state(engine)
        losses += [_step(engine, bundle, loss_fn, s, rank, world) for s in (2, 3)]
        out[stage] = {"losses": losses, "state": state if rank == 0 else None, "adam_steps": _adam_steps(engine),
                      "groups": _group_settings(engine)}
    return out


def _resume_and_train(rank: int, world: int, base: str) -> dict[int, dict]:
    from dsclip import checkpoint as ckpt
    from dsclip.reshard import universal_load

    out = {}
    for stage in STAGES:
        ckpt_dir = os.path.join(base, f"zero{stage}")
        engine, bundle, loss_fn, (load_dir, load_tag) = _engine(rank, world, stage, (ckpt_dir, "step_00000002"))
        with universal_load(engine, load_dir, load_tag):
            client = ckpt.load_checkpoint(engine, load_dir, load_tag, rank)
        state, steps = _state(engine), _adam_steps(engine)
        losses = [_step(engine, bundle, loss_fn, s, rank, world) for s in (2, 3)]
        scale = engine.module.logit_scale
        out[stage] = {"losses": losses, "state": state if rank == 0 else None, "adam_steps": steps,
                      "adam_steps_after": _adam_steps(engine), "client": client, "load": (load_dir, load_tag),
                      "groups": _group_settings(engine), "logit_scale_shape": list(getattr(scale, "ds_shape", scale.shape))}
    return out


def _differences(a: dict, b: dict) -> dict[str, float]:
    """``{"param/state": max abs difference}`` for every state that differs."""
    assert a.keys() == b.keys()
    out = {}
    for name, tensors in a.items():
        assert tensors.keys() == b[name].keys(), name
        for k, t in tensors.items():
            x, y = t.reshape(-1), b[name][k].reshape(-1)
            assert x.shape == y.shape and x.numel() > 0, (name, k, x.shape, y.shape)
            if not torch.equal(x, y):
                out[f"{name}/{k}"] = float((x - y).abs().max())
    return out


def test_zero2_and_zero3_checkpoints_from_2_ranks_resume_on_1_and_4(tmp_path, fault_row):
    base = str(tmp_path)
    saved = run_ranks(_train_and_save, 2, base, timeout=400)[0]
    gaps: dict[tuple[int, int], float] = {}
    for world in (1, 4):
        resumed = run_ranks(_resume_and_train, world, base, timeout=400)[0]
        for stage in STAGES:
            old, res = saved[stage], resumed[stage]
            ckpt_dir = os.path.join(base, f"zero{stage}")
            assert old["adam_steps"] == [4.0]
            assert res["load"] == (ckpt_dir, "step_00000002_universal")
            assert res["client"]["step"] == 2 and res["client"]["batch_in_epoch"] == 2
            assert res["logit_scale_shape"] == [1]
            assert res["groups"] == old["groups"]  # per-group lr and weight decay survive
            assert res["adam_steps"] == [2.0]  # the step count came back, not only the moments
            assert res["adam_steps_after"] == [4.0]  # and every group counts on from it
            assert _differences(old["state"], res["state"]) == {}  # includes the frozen weights
            gaps[stage, world] = max(abs(a - b) for a, b in zip(res["losses"], old["losses"][2:]))
            assert gaps[stage, world] < LOSS_TOL, (stage, world, res["losses"], old["losses"])
            with open(os.path.join(ckpt_dir, "step_00000002_universal", "dsclip_universal.json")) as fh:
                assert json.load(fh)["source_world_size"] == 2
    for stage in STAGES:
        names = os.listdir(os.path.join(base, f"zero{stage}"))
        assert not [n for n in names if ".tmp" in n] and "latest_universal" not in names  # no debris
    fault_row.update(fault="world size changes on resume (ZeRO-2 and ZeRO-3)",
                     injected="save on 2 ranks, load on 1 and on 4",
                     outcome=f"universal conversion; fp32, Adam state and frozen weights exact; next 2 losses "
                             f"within {max(gaps.values()):.1e}", steps_lost=0, samples_lost=0, checkpoints_lost=0)


def test_same_world_size_loads_in_place(tmp_path):
    from dsclip.checkpoint import write_manifest
    from dsclip.reshard import prepare_resume

    tag_dir = tmp_path / "step_00000002"
    tag_dir.mkdir()
    write_manifest(str(tag_dir), {"step": 2, "zero_stage": 2, "world_size": 2})
    assert prepare_resume(str(tmp_path), "step_00000002", 2, 0) == (str(tmp_path), "step_00000002", {})
    write_manifest(str(tag_dir), {"step": 2, "zero_stage": 0, "world_size": 2})  # ZeRO-0 loads anywhere
    assert prepare_resume(str(tmp_path), "step_00000002", 4, 0) == (str(tmp_path), "step_00000002", {})


# ---------------------------------------------------------------- through the trainer



def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


def test_trainer_resumes_a_2_rank_run_on_1_and_4_ranks(tmp_path, fault_row):
    # 32 samples / global batch 8 = 4 steps; a checkpoint at step 2; the loss logged every step
    def args(name, batch, *extra):
        return tiny_args(str(tmp_path), name, "--train-num-samples", "32", "--batch-size", str(batch),
                         "--save-every-n-steps", "2", "--keep-last-n", "5", "--log-every-n-steps", "1",
                         *NO_EVAL, *extra)

    proc = launch_train(args("two", 4), nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    reference = _losses(tmp_path / "two")
    tag = tmp_path / "two" / "checkpoints" / "step_00000002"
    gaps = {}
    for nproc, batch in ((1, 8), (4, 2)):
        name = f"on{nproc}"
        proc = launch_train(args(name, batch, "--resume", str(tag)), nproc=nproc, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:]
        assert "resumed step_00000002" in proc.stdout
        assert ("converted it" in proc.stdout) == (nproc == 1)  # the 4-rank job reuses the conversion
        got = _losses(tmp_path / name)
        assert sorted(got) == [3, 4], got
        gaps[nproc] = max(abs(got[s] - reference[s]) for s in (3, 4))
        assert gaps[nproc] < LOSS_TOL, (nproc, got, reference)
    fault_row.update(fault="world size changes on resume (trainer)", injected="2-rank run resumed on 1 and 4 ranks",
                     outcome=f"losses of steps 3-4 within {max(gaps.values()):.1e} of the 2-rank run",
                     steps_lost=0, samples_lost=0, checkpoints_lost=0)
