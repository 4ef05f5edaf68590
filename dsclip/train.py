"""dsclip's training entry point.

Runnable three ways, because launchers execute a file:
  deepspeed --hostfile hosts dsclip/train.py --ds_config ds_configs/zero2.json ...
  torchrun --nproc_per_node 2 dsclip/train.py ...
  python -m dsclip.train ...      (or `dsclip train ...`)
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # executed by path: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import math
import time
from dataclasses import dataclass, field
from typing import Any

from dsclip.config import Config, ConfigError, mask_url_credentials, parse_args
from dsclip.faultinject import after_step_fault, trace_keys
from dsclip.progress import ProgressMeter, meminfo_kib, memory_kib, report_memory

LN_100 = math.log(100.0)
EXPORT_TOLERANCE = 1e-4  # max abs difference of the export's embeddings from the engine's (fp32)
EXPORT_TOLERANCE_16BIT = 5e-2


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # micro batches of `epoch` already consumed
    samples_seen: int = 0

    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "samples_seen": self.samples_seen}


@dataclass
class Run:
    """Everything the loop needs, built once by ``setup``."""
    cfg: Config
    ctx: Any
    engine: Any
    bundle: Any
    source: Any
    loss_fn: Any
    lr: Any
    logger: Any
    evaluator: Any
    guards: Any
    run_dir: str
    ckpt_dir: str
    steps_per_epoch: int
    total_steps: int
    epochs: int
    meta: dict
    state: TrainState = field(default_factory=TrainState)
    dtype: Any = None
    last_saved_step: int = -1
    last_train_loss: float = float("nan")
    watchdog: Any = None
    rss_at_start: int = 0


# ---------------------------------------------------------------- validation (cheap, before any model)

def validate(cfg: Config) -> None:
    """Catch bad input before any heavy work.  Raises ConfigError with a one-line fix."""
    from dsclip.engine import load_ds_config

    o, d, r = cfg.optim, cfg.data, cfg.run
    load_ds_config(r.ds_config)
    if cfg.model.model.endswith(".json") and not os.path.isfile(cfg.model.model):
        raise ConfigError(f"model config not found: {cfg.model.model}; pass an existing open_clip model-config "
                          f"JSON or a model name")
    pre = cfg.model.pretrained
    if pre and (os.sep in pre or pre.endswith((".pt", ".pth", ".bin", ".safetensors"))) and not os.path.exists(pre):
        raise ConfigError(f"--pretrained file not found: {pre}; pass an existing checkpoint or a pretrained tag")
    if r.resume and r.resume != "latest" and not os.path.exists(r.resume):
        raise ConfigError(f"--resume path not found: {r.resume}; pass a run/checkpoint dir or 'latest'")
    if cfg.eval.wise_ft_alphas and not cfg.model.pretrained:
        raise ConfigError("--wise-ft-alphas ensembles with the starting weights; it needs --pretrained")
    if cfg.eval.wise_ft_alphas and not (cfg.eval.zeroshot_data or cfg.eval.imagenet_val or d.val_data):
        from dsclip.wiseft import parse_alphas

        if len(parse_alphas(cfg.eval.wise_ft_alphas)) > 1:
            raise ConfigError("--wise-ft-alphas chooses an alpha by evaluating each one; give --zeroshot-data or "
                              "--imagenet-val (out of distribution) and --val-data (the fine-tuning task)")
    if r.resume == "latest" and not r.name:
        raise ConfigError("--resume latest needs --name of the run to continue (its dir is --logs/--name)")
    for name, val, lo in (("--batch-size", o.batch_size, 1), ("--accum-freq", o.accum_freq, 1),
                          ("--workers", d.workers, 0), ("--keep-last-n", r.keep_last_n, 1),
                          ("--log-every-n-steps", r.log_every_n_steps, 1)):
        if val < lo:
            raise ConfigError(f"{name} must be >= {lo}, got {val}")
    if o.epochs is not None and o.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {o.epochs}")
    if o.lr is not None and o.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {o.lr}")
    if o.lr_scheduler == "const-cooldown" and not o.epochs_cooldown:
        raise ConfigError("--lr-scheduler const-cooldown needs --epochs-cooldown N")
    if d.train_data_upsampling_factors and not d.dataset_resampled:
        raise ConfigError("--train-data-upsampling-factors needs --dataset-resampled")
    if cfg.model.force_image_size and len(cfg.model.force_image_size) > 2:
        raise ConfigError("--force-image-size takes H or H W")
    if r.precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--precision fp16 is not supported on CPU; use --precision bf16 or fp32")


# ---------------------------------------------------------------- setup

def setup(cfg: Config) -> Run:
    import torch
    import torch.distributed as dist

    from dsclip.config import save_yaml
    from dsclip.data import build_source
    from dsclip.engine import (
        fill_ds_config,
        initialize_engine,
        load_ds_config,
        resolve_precision,
        setup_distributed,
        zero_stage,
    )
    from dsclip.loss import build_loss
    from dsclip.model import create_model, precision_dtype
    from dsclip.schedule import GroupLR, lr_factor_fn
    from dsclip.strategies import (
        apply_strategy,
        apply_strategy_defaults,
        describe_param_groups,
        format_param_group_table,
        param_groups_for,
    )

    ctx = setup_distributed(cfg)
    if cfg.data.s3_endpoint_url:  # one endpoint for the shards and for --remote-sync checkpoints
        os.environ["AWS_ENDPOINT_URL_S3"] = cfg.data.s3_endpoint_url
    import open_clip  # noqa: F401 - loaded now so the footprint below covers it

    rss_at_start = memory_kib("VmRSS")  # the framework's own footprint, before any model state
    on_gpu = ctx.device.type != "cpu"
    precision = resolve_precision(cfg, on_gpu)
    notes = apply_strategy_defaults(cfg)
    # the data and the memory plan first, before any model or run dir: no matching shard, a missing
    # bucket, denied access, too few samples or a plan that cannot fit is one line now, not an error
    # (or an OOM kill) after minutes of model building
    from dsclip.data import preflight

    checked = preflight(cfg, "train", ctx.world)
    if checked is not None:
        _steps_per_epoch(checked.num_batches, cfg.optim.accum_freq)
    preflight(cfg, "val", ctx.world)
    ds = fill_ds_config(load_ds_config(cfg.run.ds_config), cfg, ctx.world, precision)
    if cfg.run.memory_check:
        _check_memory(cfg, ds, precision, ctx)
    cfg.run.name = _agreed_name(cfg.run.name)
    run_dir = os.path.join(cfg.run.logs, cfg.run.name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if ctx.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        save_yaml(cfg, os.path.join(run_dir, "params.yaml"))
    torch.manual_seed(cfg.run.seed + ctx.rank)
    partitioned = zero_stage(ds) == 3 and cfg.model.zero_init != "off"
    resume = _find_resume(cfg, ckpt_dir, ctx)
    if resume is not None:  # vet the pickles; another world size loads through a universal checkpoint
        from dsclip.reshard import merge_config, prepare_resume

        load_dir, load_tag, overrides = prepare_resume(*resume, ctx.world, ctx.rank,
                                                       trust=cfg.model.trust_checkpoint)
        ds = merge_config(ds, overrides)
        resume = (*resume, load_dir, load_tag)
    bundle = create_model(cfg, ctx.device, load_weights=resume is None, zero3_config=ds if partitioned else None)
    frozen = apply_strategy(bundle.model, cfg)
    groups = param_groups_for(bundle.model, cfg)
    rows = describe_param_groups(bundle.model, groups, frozen)
    if cfg.strategy.dump_param_groups and ctx.is_main:
        import json

        print(format_param_group_table(rows), flush=True)
        with open(os.path.join(run_dir, "param_groups.json"), "w") as fh:
            json.dump(rows, fh, indent=1)
    promoted = getattr(bundle.model, "_dsclip_promoted", [])
    state_keys = list(bundle.model.state_dict().keys())
    n_trainable = sum(getattr(p, "ds_numel", 0) or p.numel() for g in groups for p in g["params"])
    engine = initialize_engine(bundle.model, groups, ds, on_gpu)

    source = build_source(cfg, "train", bundle.preprocess_train, bundle.tokenizer, bundle.image_size,
                          ctx.rank, ctx.world, checked=checked)
    steps_per_epoch = _steps_per_epoch(source.num_batches, cfg.optim.accum_freq)
    epochs = cfg.optim.epochs
    total = epochs * steps_per_epoch
    if cfg.optim.max_steps:
        total = min(total, cfg.optim.max_steps)
    cooldown = (cfg.optim.epochs_cooldown or 0) * steps_per_epoch
    base_lr = cfg.optim.lr
    factor = lr_factor_fn(cfg.optim.lr_scheduler, cfg.optim.warmup, total, cooldown, cfg.optim.lr_cooldown_power,
                          cfg.optim.lr_cooldown_end / base_lr if base_lr else 0.0)
    lr = GroupLR(engine.optimizer, factor)

    from dsclip.metrics import MetricsLogger

    logger = MetricsLogger(run_dir, cfg.run.report_to, ctx.rank, cfg.to_dict(mask_secrets=True))
    evaluator, guards = _build_eval(cfg, bundle, ctx)
    meta = {"zero_stage": zero_stage(ds), "param_shapes": {k: [] for k in promoted},  # open_clip's 0-dim
            "state_keys": state_keys, "model": bundle.name, "model_config": bundle.model_cfg,
            "world_size": ctx.world}
    run = Run(cfg, ctx, engine, bundle, source, build_loss(cfg.loss, group=None), lr, logger, evaluator, guards,
              run_dir, ckpt_dir, steps_per_epoch, total, epochs, meta,
              dtype=precision_dtype(precision))
    if ctx.is_main:
        for line in notes + bundle.notes:
            print(f"[dsclip] {line}", flush=True)
        print(f"[dsclip] {ctx.world} rank(s) on {ctx.device.type} ({ctx.backend}), ZeRO-{zero_stage(ds)}, "
              f"{precision}, {n_trainable:,} trainable params, "
              f"{steps_per_epoch} steps/epoch x {epochs} epochs = {total} steps, run dir {run_dir}", flush=True)
    if resume is not None:
        _load_resume(run, *resume)
    dist.barrier()
    from dsclip.watchdog import Watchdog

    run.rss_at_start = rss_at_start
    run.watchdog = Watchdog(run_dir, ctx.rank, ctx.world, cfg.run.dist_timeout)
    run.watchdog.beat(run.state.step)
    return run


def _steps_per_epoch(num_batches: int, accum_freq: int) -> int:
    """Optimizer steps in an epoch of ``num_batches`` per rank; ConfigError when there are none."""
    if num_batches < accum_freq:
        raise ConfigError(f"an epoch has {num_batches} batches per rank, fewer than --accum-freq "
                          f"{accum_freq}; use more samples or a smaller batch")
    return num_batches // accum_freq


def _check_memory(cfg: Config, ds: dict, precision: str, ctx) -> None:
    """Refuse, before building anything, a plan whose estimate exceeds this rank's memory."""
    import torch
    import torch.distributed as dist

    from dsclip.engine import offloads_optimizer, zero_stage
    from dsclip.plan import GIB, RUNTIME_OVERHEAD_GIB, check_fits

    overhead = RUNTIME_OVERHEAD_GIB
    if cfg.run.memory_budget_gib:
        budget = cfg.run.memory_budget_gib
    elif ctx.device.type != "cpu":
        from deepspeed.accelerator import get_accelerator

        budget = get_accelerator().total_memory(ctx.local_rank) / GIB
        overhead += 0.5  # CUDA context and NCCL buffers are not in the framework's footprint yet
    else:  # what the machine has left now that every local rank has started, shared between them
        budget = meminfo_kib("MemAvailable") * 1024 / GIB / max(1, ctx.local_world)
    # every rank must reach the same verdict, or one refuses while the others wait for it
    box = torch.tensor([budget], dtype=torch.float64)
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    budget = float(box)
    if budget > 0 and not offloads_optimizer(ds):
        check_fits(cfg, zero_stage(ds), precision, ctx.world, budget, overhead)


def _agreed_name(name: str | None) -> str:
    """Every rank must use the same run name; rank 0's timestamp wins."""
    import torch.distributed as dist

    box = [name or time.strftime("%Y_%m_%d-%H_%M_%S")]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _build_eval(cfg: Config, bundle, ctx):
    try:
        from dsclip.evaluate import Evaluator
        from dsclip.guards import Guards
    except ImportError:
        return None, None
    return (Evaluator(cfg, bundle.tokenizer, bundle.preprocess_val, bundle.image_size, ctx.rank, ctx.world,
                      None, ctx.device), Guards(cfg.eval))


def _find_resume(cfg: Config, ckpt_dir: str, ctx) -> tuple[str, str] | None:
    """(checkpoints dir, tag) to resume from, or None for a fresh start.  Runs before the model is
    built: a resumed run takes its weights from the checkpoint, never from --pretrained."""
    import torch.distributed as dist

    from dsclip import checkpoint as ckpt

    if not cfg.run.resume:
        return None
    tag = None
    if cfg.run.resume == "latest":
        if cfg.run.remote_sync and ckpt.resolve_tag(ckpt_dir) is None:
            if ctx.is_main:  # a fresh pod: fetch the run from object storage
                fetched = ckpt.download_latest(cfg.run.remote_sync, ckpt_dir)
                if fetched:
                    print(f"[dsclip] downloaded {fetched} from {mask_url_credentials(cfg.run.remote_sync)}",
                          flush=True)
            dist.barrier()
    else:
        ckpt_dir, tag = ckpt.locate(cfg.run.resume)
    tag = ckpt.resolve_tag(ckpt_dir, tag)
    if tag is None:
        if cfg.run.resume != "latest":
            raise ConfigError(f"no complete checkpoint in {ckpt_dir}; pass another --resume path")
        if ctx.is_main:
            print(f"[dsclip] no checkpoint in {ckpt_dir} yet; starting from scratch", flush=True)
        return None
    return ckpt_dir, tag


def _load_resume(run: Run, ckpt_dir: str, tag: str, load_dir: str, load_tag: str) -> None:
    """Load ``ckpt_dir/tag``, through its universal copy ``load_dir/load_tag`` when it was saved by
    another world size (see dsclip.reshard)."""
    from dsclip import checkpoint as ckpt
    from dsclip.data import check_resume_data, restore_position
    from dsclip.reshard import universal_load

    with universal_load(run.engine, load_dir, load_tag):
        client = ckpt.load_checkpoint(run.engine, load_dir, load_tag, run.ctx.rank)
    data = client.get("data_position") or {}
    saved_world = data.get("world") or ckpt.read_meta(os.path.join(ckpt_dir, tag)).get("world_size")
    note = check_resume_data(run.cfg, client.get("config"), saved_world, run.ctx.world)
    if note and run.ctx.is_main:
        print(f"[dsclip] WARNING: {note}", flush=True)
    restore_position(run.source, data, run.ctx.rank, run.ctx.world)
    run.state = TrainState(client["step"], client["epoch"], client["batch_in_epoch"], client["samples_seen"])
    if run.guards is not None and client.get("guards"):
        run.guards.load_state_dict(client["guards"])  # keeps the forgetting baseline and the best value
    run.last_saved_step = run.state.step
    if run.ctx.is_main:
        kept = " from the saved reader positions" if data and data.get("world") == run.ctx.world else ""
        print(f"[dsclip] resumed {tag} from {ckpt_dir}: step {run.state.step}, epoch {run.state.epoch}, "
              f"batch {run.state.batch_in_epoch}{kept}", flush=True)


# ---------------------------------------------------------------- the loop

def train(cfg: Config) -> dict[str, Any]:
    run = setup(cfg)
    s, k = run.state, cfg.optim.accum_freq
    meter = ProgressMeter(run)
    if s.step == 0 and run.evaluator is not None and cfg.eval.baseline_eval:
        evaluate(run, epoch_end=False, baseline=True)
    stop = s.step >= run.total_steps
    while not stop and s.epoch < run.epochs:
        micro_per_epoch = run.steps_per_epoch * k
        batches = run.source.batches(s.epoch, s.batch_in_epoch)
        while not stop and s.batch_in_epoch < micro_per_epoch:
            micro = [meter.next_batch(batches) for _ in range(k)]
            meter.add(train_step(run, micro))
            s.batch_in_epoch += k
            s.samples_seen += sum(len(b["keys"]) for b in micro) * run.ctx.world
            s.step += 1
            stop = after_step(run, meter)
        if s.batch_in_epoch >= micro_per_epoch:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            stop = evaluate(run, epoch_end=True) or stop
            if cfg.run.save_frequency and s.epoch % cfg.run.save_frequency == 0:
                save(run)
    return finish(run)


def train_step(run: Run, micro: list[dict]) -> float:
    """One optimizer step over ``accum_freq`` micro batches; returns the step's loss."""
    from dsclip.accumulate import contrastive_step, plain_step

    run.lr.set_step(run.state.step)
    inputs = [(b["image"].to(run.ctx.device, dtype=run.dtype, non_blocking=True),
               b["text"].to(run.ctx.device, non_blocking=True)) for b in micro]
    step = contrastive_step if run.cfg.optim.accum_mode == "contrastive" else plain_step
    loss = step(run.engine, run.loss_fn, inputs)
    for i, b in enumerate(micro):
        trace_keys(run.ctx.rank, run.state.epoch, b, run.state.batch_in_epoch + i)
    return loss


def after_step(run: Run, meter: ProgressMeter) -> bool:
    """Bookkeeping after an optimizer step; returns True when training should stop."""
    from dsclip.model import clamp_logit_scale

    cfg, s = run.cfg, run.state
    run.watchdog.beat(s.step)
    clamp_logit_scale(run.engine.module, LN_100)
    if s.step % cfg.run.log_every_n_steps == 0 or s.step == run.total_steps:
        meter.report()
    if cfg.run.save_every_n_steps and s.step % cfg.run.save_every_n_steps == 0:
        save(run)
    after_step_fault(s.step)
    if s.step >= run.total_steps:
        return True
    if cfg.eval.eval_every_n_steps and s.step % cfg.eval.eval_every_n_steps == 0:
        return evaluate(run, epoch_end=False)
    return False


def evaluate(run: Run, epoch_end: bool, baseline: bool = False) -> bool:
    """Run the due evaluations; returns True when a guard asks to stop."""
    if run.evaluator is None:
        return False
    s = run.state
    if not baseline and not run.evaluator.should_run(epoch_end, s.epoch, s.step):
        return False
    with _paused(run):
        metrics = run.evaluator.run(run.engine, s.step, s.epoch)
    if not metrics:
        return False
    run.logger.log(metrics, step=s.step, kind="baseline" if baseline else "eval", epoch=s.epoch)
    decision = run.guards.update(s.step, run.last_train_loss, metrics)
    if run.ctx.is_main:
        print("[dsclip] eval " + " ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())), flush=True)
        for w in decision.warnings:
            print(f"[dsclip] WARNING: {w}", flush=True)
    if decision.is_best and not baseline:
        save(run, best=True)
    return decision.stop


def save(run: Run, best: bool = False) -> None:
    from dsclip import checkpoint as ckpt
    from dsclip.data import position_state

    s = run.state
    if run.last_saved_step != s.step:
        client = {**s.client_state(), "config": run.cfg.to_dict(mask_secrets=True),
                  "guards": run.guards.state_dict() if run.guards is not None else None,
                  "data_position": position_state(run.source)}  # collective: every rank's reader position
        with _paused(run):
            ckpt.save_checkpoint(run.engine, run.ckpt_dir, s.step, client, run.ctx.rank, run.cfg.run.keep_last_n,
                                 run.meta, protect=(_best_tag(run),))
        run.last_saved_step = s.step
        if run.cfg.run.remote_sync:  # collective: rank 0 uploads in the background, a failure stops every rank
            ckpt.sync_checkpoint(run.ckpt_dir, ckpt.tag_for(s.step), run.cfg.run.remote_sync, run.ctx.rank)
    if best and run.ctx.is_main:
        ckpt.atomic_write_text(os.path.join(run.ckpt_dir, "best"), ckpt.tag_for(s.step))


class _paused:
    """Evaluation and checkpointing are not optimizer steps; keep the watchdog quiet meanwhile."""

    def __init__(self, run: Run):
        self.w = run.watchdog

    def __enter__(self):
        if self.w is not None:
            self.w.paused = True

    def __exit__(self, *exc):
        if self.w is not None:
            self.w.paused = False
            self.w.beat(self.w.step)


def _best_tag(run: Run) -> str:
    path = os.path.join(run.ckpt_dir, "best")
    return open(path).read().strip() if os.path.isfile(path) else ""


def finish(run: Run) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from dsclip.export import export, verify_export

    save(run)
    run.watchdog.paused = True  # export and verification are not steps
    final = os.path.join(run.run_dir, "final.safetensors")
    probe = _probe_embeddings(run)  # collective under ZeRO-3: every rank runs it
    report_memory(run)
    # the last collective: rank 0 then exports, verifies and sweeps WiSE-FT on its own while the
    # other ranks end, so no rank waits in a barrier (and its timeout) for work of unbounded length
    dist.barrier()
    run.watchdog.close()
    if run.ctx.is_main:
        export(run.run_dir, final)
        diff = verify_export(final, run.bundle.name, run.cfg, probe, os.path.join(run.run_dir, "export_check.pt"))
        # embeddings are unit vectors: fp32 agrees to ~1e-6; a 16-bit engine differs from the fp32 reload
        tol = EXPORT_TOLERANCE if run.dtype == torch.float32 else EXPORT_TOLERANCE_16BIT
        if not diff <= tol:
            raise RuntimeError(f"{final} does not reproduce the engine's embeddings (max abs diff {diff:.2e} > "
                               f"{tol:g}); the checkpoints in {run.ckpt_dir} are intact: export one with "
                               f"`dsclip export` and report this")
        print(f"[dsclip] done: {run.state.step} steps; weights {final} (open_clip reload matches the engine: "
              f"max abs diff {diff:.2e})", flush=True)
        if run.cfg.eval.wise_ft_alphas:
            _wiseft_after_training(run, final)
    run.logger.close()
    return {"run_dir": run.run_dir, "final": final, "step": run.state.step}


def _wiseft_after_training(run: Run, final: str) -> None:
    """``--wise-ft-alphas``: ensemble the starting weights with the fine-tuned ones (rank 0 only;
    plain single-process evaluation, no collectives)."""
    import open_clip
    from safetensors.torch import load_file

    from dsclip.evaluate import Evaluator
    from dsclip.wiseft import load_weights, parse_alphas, run_wiseft_sweep, state_dict_evaluator

    cfg, b = run.cfg, run.bundle
    force = cfg.model.force_image_size
    model = open_clip.create_model(b.name, force_image_size=None if not force else
                                   (force[0] if len(force) == 1 else tuple(force[:2])),
                                   force_context_length=cfg.model.force_context_length, output_dict=True)
    evaluator = Evaluator(cfg, b.tokenizer, b.preprocess_val, b.image_size, 0, 1, None, run.ctx.device)
    out = os.path.join(run.run_dir, "wiseft")
    result = run_wiseft_sweep(load_weights(cfg.model.pretrained, b.name, cfg.model.trust_checkpoint), load_file(final),
                              parse_alphas(cfg.eval.wise_ft_alphas),
                              state_dict_evaluator(model.to(run.ctx.device), evaluator), out)
    print(f"[dsclip] WiSE-FT sweep in {out}; chosen alpha {result.best.get('alpha')}", flush=True)


def _probe_embeddings(run: Run) -> dict[str, Any]:
    """The engine's own embeddings of a fixed probe batch, to check the export against."""
    import torch

    from dsclip.data.synthetic import synthetic_sample

    images, captions = zip(*(synthetic_sample(12345, i, run.bundle.image_size) for i in range(4)))
    images, texts = torch.stack(images), run.bundle.tokenizer(list(captions))
    module = run.engine.module
    was_training = module.training
    module.eval()
    with torch.no_grad():
        out = run.engine(image=images.to(run.ctx.device, dtype=run.dtype), text=texts.to(run.ctx.device))
    module.train(was_training)
    return {"image": images, "text": texts, "image_features": out["image_features"].float().cpu(),
            "text_features": out["text_features"].float().cpu()}


# ---------------------------------------------------------------- entry

def _one_line(e: BaseException) -> str:
    """The error's own message.  An error raised in a DataLoader worker arrives re-wrapped with
    the worker's traceback; its last line is the original ``module.Type: message``."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [ln for ln in text.splitlines() if ln.strip()][-1]
    return last.split(f"{type(e).__name__}: ", 1)[-1]


def main(argv: list[str] | None = None) -> int:
    from dsclip.engine import env_rank
    from dsclip.watchdog import close_active, peer_failure_message

    try:
        cfg = parse_args(argv)
        validate(cfg)
        train(cfg)
        from dsclip.checkpoint import finish_uploads

        finish_uploads()  # rank 0: the last checkpoint's upload
    except ConfigError as e:
        if env_rank() == 0:
            print(f"dsclip: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:  # the known failures get one clear line, no traceback wall
        if type(e).__name__ == "DataError":  # unreadable training data
            print(f"dsclip: error: rank {env_rank()}: {_one_line(e)}", file=sys.stderr, flush=True)
            return 1
        if type(e).__name__ == "RemoteSyncError":  # raised on every rank together
            if env_rank() == 0:
                print(f"dsclip: error: {e}", file=sys.stderr, flush=True)
            return 1
        line = peer_failure_message(e)  # a collective failed because a peer rank is gone
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        return 1
    finally:  # after a failure: abandon uploads still running, silence the watchdog
        if "dsclip.checkpoint" in sys.modules:
            sys.modules["dsclip.checkpoint"].cancel_uploads()
        close_active()
    return 0


if __name__ == "__main__":
    sys.exit(main())
