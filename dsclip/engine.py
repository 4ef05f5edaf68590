"""Distributed setup, the DeepSpeed config, and the engine.

The DeepSpeed JSON owns parallelism (ZeRO stage, buckets, offload).  Values the CLI owns are
written ``"auto"`` in the JSON and filled here, so one file serves every run; an explicit JSON
value that contradicts an explicit flag is an error rather than a silent override.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from .config import Config, ConfigError

# The built-in default when --ds_config is not given; ds_configs/zero2.json holds the same
# settings (a test keeps them in sync).
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                              "weight_decay": "auto"}},
    "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": "auto",
                          "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    """Global rank from the launcher's environment, before any process group exists."""
    for var in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def setup_distributed(cfg: Config) -> DistContext:
    """Initialise the process group from whichever launcher started us (deepspeed, torchrun,
    a PyTorchJob pod running torchrun, SLURM's srun, or a plain single process)."""
    import deepspeed

    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # srun, one task per device, no torchrun
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        if "SLURM_NTASKS_PER_NODE" in os.environ:
            os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0])
        if "MASTER_ADDR" not in os.environ:
            raise ConfigError("srun without torchrun: export MASTER_ADDR (the first node, e.g. from "
                              "`scontrol show hostnames $SLURM_JOB_NODELIST | head -1`) and MASTER_PORT")
        os.environ.setdefault("MASTER_PORT", "29500")
    local_rank = cfg.run.local_rank if cfg.run.local_rank >= 0 else int(os.environ.get("LOCAL_RANK", "0"))
    os.environ["LOCAL_RANK"] = str(local_rank)
    single = "WORLD_SIZE" not in os.environ
    if single:  # plain `python dsclip/train.py`: a world of one
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_gpu = acc.device_name() != "cpu"
    backend = acc.communication_backend_name() if on_gpu else "gloo"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if not on_gpu:
        threads = cfg.run.threads or max(1, (os.cpu_count() or 1) // max(1, local_world))
        torch.set_num_threads(threads)
    # dsclip's watchdog (dist_timeout) reports a stuck job with every rank's last step; the
    # backend's own timeout is the later fallback.
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=2 * cfg.run.dist_timeout + 60),
                               verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not on_gpu:
        release_shm_buffer_name(rank)
    if on_gpu:
        acc.set_device(local_rank)
        device = torch.device(acc.device_name(local_rank))
    else:
        device = torch.device("cpu")
    return DistContext(rank, world, local_rank, local_world, device, backend)


def release_shm_buffer_name(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory allreduce buffer name (CPU accelerator).

    DeepSpeed's shm comm op creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
    (~70 MB) per rank and removes it only on an orderly shutdown, so every killed or crashed job
    leaves its buffers in RAM-backed /dev/shm for good.  Every rank maps every buffer inside
    ``init_distributed``; once all have (the barrier), the names are no longer needed and the
    memory goes back to the system when the last process holding the mapping exits, however
    it exits."""
    import torch.distributed as dist

    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    dist.barrier()  # every rank has opened every buffer (called by all ranks, buffer or not)
    try:
        os.unlink(name)
    except FileNotFoundError:  # multi-node jobs, or a DeepSpeed without the shm op
        pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_precision(cfg: Config, on_gpu: bool) -> str:
    p = cfg.run.precision
    if p == "auto":
        if on_gpu:
            from deepspeed.accelerator import get_accelerator

            return "bf16" if get_accelerator().is_bf16_supported() else "fp16"
        return "fp32"
    if p == "fp16" and not on_gpu:
        raise ConfigError("--precision fp16 is not supported on CPU; use --precision bf16 or fp32")
    return p


def load_ds_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return copy.deepcopy(DEFAULT_DS_CONFIG)
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config not found: {path}; pass an existing JSON file to --ds_config "
                          f"(see ds_configs/)")
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); fix the file") from None


def _fill(section: dict, key: str, value: Any, flag: str | tuple[str, ...] | None, cfg: Config,
          where: str) -> None:
    """Fill ``section[key]``: "auto" or missing takes ``value``; an explicit JSON value must agree
    with an explicitly set flag (any of ``flag`` when several flags make up the value)."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
        return
    flags = (flag,) if isinstance(flag, str) else flag or ()
    if any(cfg.is_set(f) for f in flags) and not _same(current, value):
        raise ConfigError(f"ds_config {where}.{key}={current!r} contradicts the command line ({value!r}); "
                          f"set it to \"auto\" in the JSON or drop the flag")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


def _fill_nvme_paths(zo: dict[str, Any], cfg: Config) -> None:
    """ZeRO-Infinity's ``nvme_path`` ("auto" takes ``--nvme-path``); the directory must exist,
    so a typo is one line now rather than an aio error after the model is built."""
    for section in ("offload_optimizer", "offload_param"):
        sec = zo.get(section) or {}
        if sec.get("device") != "nvme":
            continue
        _fill(sec, "nvme_path", cfg.run.nvme_path, "run.nvme_path", cfg, f"zero_optimization.{section}")
        path = sec["nvme_path"]
        if not path:
            raise ConfigError(f"ds_config offloads {section.split('_')[1]} to NVMe but nvme_path is \"auto\"; "
                              "pass --nvme-path DIR (a fast local disk on every node)")
        if not os.path.isdir(path) or not os.access(path, os.W_OK):
            raise ConfigError(f"nvme_path {path} is not a writable directory; create it on every node or "
                              "pass another --nvme-path")


def fill_ds_config(ds: dict[str, Any], cfg: Config, world: int, precision: str) -> dict[str, Any]:
    """Resolve every "auto" value from the CLI config.  Returns a new dict."""
    ds = copy.deepcopy(ds)
    o = cfg.optim
    _fill(ds, "train_micro_batch_size_per_gpu", o.batch_size, "optim.batch_size", cfg, "")
    _fill(ds, "gradient_accumulation_steps", o.accum_freq, "optim.accum_freq", cfg, "")
    _fill(ds, "train_batch_size", ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world,
          None, cfg, "")
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world:
        raise ConfigError("ds_config train_batch_size must equal batch size x accumulation x world size; "
                          "set it to \"auto\"")
    _fill(ds, "gradient_clipping", o.grad_clip_norm or 0.0, "optim.grad_clip_norm", cfg, "")
    for name in ("bf16", "fp16"):
        sec = ds.setdefault(name, {})
        _fill(sec, "enabled", precision == name, "run.precision", cfg, name)
    if ds["bf16"]["enabled"] and ds["fp16"]["enabled"]:
        raise ConfigError("ds_config enables both bf16 and fp16; enable one, or use \"auto\" with --precision")
    if "scheduler" in ds:
        raise ConfigError("ds_config has a 'scheduler' section, but dsclip owns the LR schedule; remove it and "
                          "use --lr-scheduler/--warmup")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "AdamW")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"ds_config optimizer type {opt.get('type')!r} is not supported; use AdamW")
    params = opt.setdefault("params", {})
    _fill(params, "lr", o.lr, "optim.lr", cfg, "optimizer.params")
    _fill(params, "betas", [o.beta1, o.beta2], ("optim.beta1", "optim.beta2"), cfg, "optimizer.params")
    _fill(params, "eps", o.eps, "optim.eps", cfg, "optimizer.params")
    _fill(params, "weight_decay", o.wd, "optim.wd", cfg, "optimizer.params")
    ds.setdefault("zero_optimization", {"stage": 0})
    _fill_nvme_paths(ds["zero_optimization"], cfg)
    ds.setdefault("steps_per_print", 1_000_000_000)
    # dsclip checkpoints frozen parameters too: exports and resumes must carry them.
    ds.setdefault("checkpoint", {}).setdefault("exclude_frozen_parameters", False)
    return ds


ZERO3_AUTO_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
                   "stage3_max_live_parameters", "stage3_max_reuse_distance", "sub_group_size")


def model_hidden_size(model: torch.nn.Module) -> int:
    """The model's widest hidden size: the largest smaller side of a 2-D weight (768 for ViT-B-32's
    image tower).  Works on ZeRO-3-partitioned parameters, whose real shape is ``ds_shape``."""
    h = 0
    for p in model.parameters():
        shape = tuple(getattr(p, "ds_shape", None) or p.shape)
        if len(shape) == 2:
            h = max(h, min(shape))
    return h or 1024


def without_auto_buckets(ds: dict[str, Any]) -> dict[str, Any]:
    """``ds`` without the buffer sizes still "auto" (for ``zero.Init``, which runs before the
    model exists and does not use them)."""
    ds = copy.deepcopy(ds)
    zo = ds.get("zero_optimization", {})
    for key in [k for k in ZERO3_AUTO_KEYS if zo.get(k) == "auto"]:
        zo.pop(key)
    return ds


def fill_zero3_buckets(ds: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Size ZeRO-3's buffers from the model, for each of ``ZERO3_AUTO_KEYS`` left "auto".

    DeepSpeed's defaults (5e7-element buckets, 1e9 live parameters) are sized for billion-parameter
    models: on a ViT-B-32 they hold a gradient bucket and a prefetch window as large as a third of
    the model, so a ZeRO-3 rank used more memory than a plain data-parallel one.  With h the
    widest hidden size: buckets of h^2 and 0.9 h^2 elements (one transformer matrix), parameters
    under 10 h kept whole on every rank (biases, norms: gathering them costs more than they
    weigh), at most 10 h^2 gathered parameters alive at once (under one block of a wide tower),
    and optimizer steps over sub-groups of 10 h^2 elements, so the optimizer's temporaries are
    not the size of the whole partition.  Explicit numbers in the JSON are kept."""
    if zero_stage(ds) != 3:  # other stages: "auto" is DeepSpeed's own default
        return without_auto_buckets(ds)
    ds = copy.deepcopy(ds)
    zo = ds["zero_optimization"]
    h = model_hidden_size(model)
    auto = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h, "stage3_max_live_parameters": 10 * h * h,
            "stage3_max_reuse_distance": 10 * h * h, "sub_group_size": 10 * h * h}
    for key, value in auto.items():
        if zo.get(key, "auto") == "auto":
            zo[key] = value
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    dev = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return dev not in (None, "none")


def build_optimizer(groups: list[dict], ds: dict[str, Any], on_gpu: bool):
    """AdamW over dsclip's parameter groups.  dsclip builds the optimizer itself (from the JSON's
    filled-in params) so each group keeps its own lr/wd and extra keys, and so CPU runs need no
    compiled optimizer op.  ZeRO-Offload on GPUs uses DeepSpeed's CPU Adam; on CPU ranks the
    optimizer state is in host memory anyway, so torch's AdamW serves (no op to compile)."""
    p = ds["optimizer"]["params"]
    betas = tuple(p["betas"])
    if offloads_optimizer(ds) and on_gpu:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=p["lr"], betas=betas, eps=p["eps"], weight_decay=p["weight_decay"],
                                adamw_mode=True)
    # fused on CPU too: one pass per parameter, where the multi-tensor form allocates a fresh
    # temporary the size of a whole ZeRO partition every step (1.3 s -> 0.65 s for B/32 here)
    return torch.optim.AdamW(groups, lr=p["lr"], betas=betas, eps=p["eps"], weight_decay=p["weight_decay"],
                             fused=True)


def fill_device_defaults(ds: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """"auto" values that depend on the device: ``contiguous_gradients`` is on for GPUs (one
    gradient buffer against fragmentation) and off on CPU ranks, where copying every gradient
    into a 5e8-element bucket cost more than it saved (ViT-B-32, ZeRO-2, 1 rank: 7.2 -> 5.3 s/step)."""
    ds = copy.deepcopy(ds)
    zo = ds.get("zero_optimization", {})
    if zo.get("contiguous_gradients") == "auto":
        zo["contiguous_gradients"] = on_gpu
    return ds


def share_fp32_master_in_place() -> None:
    """Let ZeRO-3 update fp32 weights in place instead of keeping a second fp32 copy.

    DeepSpeed's stage-3 optimizer skips the master copy when a partition already has the master
    dtype and sits on the optimizer's device, but it compares ``tensor.device`` (a torch.device)
    with its own device *string*, which is never equal: fp32 training kept two fp32 copies of
    every partition (4 bytes per parameter / ranks, a third of ZeRO-3's model states).  While the
    partitions are created, the device is given as a torch.device, so that check sees what it
    means to.  bf16/fp16 runs (other dtype) and offloaded or NVMe-swapped partitions take their
    own branches, as before."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    create = DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions
    if getattr(create, "dsclip_patched", False):
        return

    def create_fp32_partitions(self):
        device = self.device
        self.device = torch.device(device)
        try:
            return create(self)
        finally:
            self.device = device

    create_fp32_partitions.dsclip_patched = True
    DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions = create_fp32_partitions


def initialize_engine(model: torch.nn.Module, groups: list[dict], ds: dict[str, Any], on_gpu: bool):
    import deepspeed

    share_fp32_master_in_place()
    optimizer = build_optimizer(groups, ds, on_gpu)
    ds = fill_device_defaults(fill_zero3_buckets(ds, model), on_gpu)
    ds.pop("optimizer", None)  # already built; DeepSpeed must not build a second one
    ds["zero_allow_untested_optimizer"] = True
    if offloads_optimizer(ds) and not on_gpu:
        ds["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on CPU ranks, see build_optimizer
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    return engine
