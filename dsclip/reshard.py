"""Resuming a ZeRO checkpoint on a different number of ranks, and vetting it before any load.

A ZeRO-1/2/3 checkpoint stores each rank's slice of the optimizer state, cut for the world
size that saved it, and DeepSpeed refuses to load it on any other world size.  DeepSpeed's
answer is the *universal* checkpoint: ``ds_to_universal`` rewrites the slices as one folder
per parameter (``zero/<name>/``: its fp32 weights and Adam moments, unsharded), and an engine
built with ``{"checkpoint": {"load_universal": true}}`` cuts them again for its own world size.

Use, on every rank, before the engine exists::

    load_dir, load_tag, overrides = prepare_resume(ckpt_dir, tag, world, rank)
    engine = deepspeed.initialize(..., config=merge_config(ds_config, overrides))
    with universal_load(engine, load_dir, load_tag):
        engine.load_checkpoint(load_dir, load_tag)

``prepare_resume`` first refuses checkpoints whose pickles would run code (DeepSpeed loads them
with ``weights_only=False``).  For another world size it converts once, on rank 0, into
``<tag>_universal/`` next to the checkpoint (built in a temp folder and renamed into place, so a
crash mid-conversion leaves nothing that looks finished; rebuilt if the checkpoint changed) while
the other ranks wait.  The copy carries the saved ranks' ``rng_rank<R>.pt`` files (new ranks
keep their seeded RNG) and the frozen weights and buffers, which the universal format leaves
out.  The trainer's pruning removes it at the first save after the resume.

``universal_load`` works around what DeepSpeed 0.19.8 gets wrong when loading one (see there).
Other notes on 0.19.8's converter:
- ordinary checkpoints carry no ``universal_checkpoint_info``, so it runs with
  ``inject_missing_state`` (plain data parallelism, which is dsclip's layout);
- it runs in-process with one worker: the ranks hold a process group, and forking a process
  pool from them is not safe; a tiny model converts in well under a second;
- dsclip's 1-element ``logit_scale`` (``model.promote_scalar_params``) is stored with the shape
  the optimizer saw, ``[1]``, and comes back with it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import glob
import hashlib
import json
import os
import shutil
import time
import types
from collections.abc import Iterator
from typing import Any

from .config import ConfigError

MANIFEST = "dsclip_manifest.json"  # written by dsclip.checkpoint for every complete tag
MARKER = "dsclip_universal.json"
EXTRAS = "frozen_and_buffers.pt"  # what the universal format leaves out (see _non_optimized_state)
SUFFIX = "_universal"
UNIVERSAL_OVERRIDES: dict[str, Any] = {"checkpoint": {"load_universal": True}}


def universal_tag(tag: str) -> str:
    return tag + SUFFIX


def read_manifest(tag_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(tag_dir, MANIFEST)) as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {os.path.join(tag_dir, MANIFEST)} ({e}); resume from a complete "
                          f"checkpoint") from None


def saved_world_size(tag_dir: str, manifest: dict[str, Any] | None = None) -> int:
    """Ranks that wrote the checkpoint: the manifest's ``world_size``, else one optimizer
    file per rank."""
    manifest = read_manifest(tag_dir) if manifest is None else manifest
    if "world_size" in manifest:
        return int(manifest["world_size"])
    files = glob.glob(os.path.join(tag_dir, "*zero_pp_rank_*_optim_states.pt"))
    return max(1, len(files))


def _fingerprint(tag_dir: str) -> str:
    """Identifies one saved checkpoint: its manifest lists every file with its size."""
    with open(os.path.join(tag_dir, MANIFEST), "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def is_converted(out_dir: str, tag_dir: str) -> bool:
    """Whether ``out_dir`` is a finished conversion of the checkpoint now in ``tag_dir``."""
    try:
        with open(os.path.join(out_dir, MARKER)) as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return False
    return marker.get("source_fingerprint") == _fingerprint(tag_dir)


def convert_to_universal(tag_dir: str, out_dir: str) -> float:
    """Write the universal form of the checkpoint in ``tag_dir`` to ``out_dir``, atomically.

    Returns the seconds it took.  The converter's own chatter goes to ``conversion.log``
    inside the result (or is shown in the error if it fails).
    """
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    start = time.monotonic()
    parent, name = os.path.split(out_dir.rstrip("/"))
    staging = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    # ds_to_universal also writes a `latest_universal` file beside its output folder: keep it
    # inside the staging folder, away from the checkpoint dir.
    work = os.path.join(staging, name)
    os.makedirs(staging)
    log_path = os.path.join(staging, "conversion.log")
    args = argparse.Namespace(input_folder=tag_dir, output_folder=work, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    tail: list[str] = []
    try:
        with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal(args)
            extras = _non_optimized_state(tag_dir, os.path.join(work, "zero"))
    except BaseException as e:
        with contextlib.suppress(OSError), open(log_path) as log:
            tail = log.read().strip().splitlines()[-3:]
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        detail = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        raise ConfigError(f"converting {tag_dir} to a universal checkpoint failed ({detail}); "
                          f"resume with the world size that saved it"
                          + (f" [converter: {' | '.join(tail)}]" if tail else "")) from None
    os.replace(log_path, os.path.join(work, "conversion.log"))
    if extras:
        import torch

        torch.save(extras, os.path.join(work, EXTRAS))
    for rng in glob.glob(os.path.join(tag_dir, "rng_rank*.pt")):
        shutil.copy2(rng, work)
    marker = {"source": os.path.abspath(tag_dir), "source_fingerprint": _fingerprint(tag_dir),
              "source_world_size": saved_world_size(tag_dir), "seconds": round(time.monotonic() - start, 3)}
    with open(os.path.join(work, MARKER), "w") as fh:
        json.dump(marker, fh, indent=1)
    if os.path.isdir(out_dir):  # a stale conversion of an older checkpoint under the same tag
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return time.monotonic() - start


def _non_optimized_state(tag_dir: str, zero_dir: str) -> dict:
    """Frozen parameters and buffers of the checkpoint, consolidated.

    A universal load restores only what the optimizer holds: DeepSpeed skips the module state
    dict, so frozen weights (and buffers such as BatchNorm statistics) would keep their fresh
    values.  They are stored beside the conversion and put back by ``universal_load``.  An
    optimized parameter is one whose folder has Adam moments.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    parent, tag = os.path.split(tag_dir.rstrip("/"))
    lazy = get_fp32_state_dict_from_zero_checkpoint(parent, tag, lazy_mode=True)
    return {name: torch.as_tensor(t.contiguous()).clone() for name, t in lazy.items()
            if not os.path.isfile(os.path.join(zero_dir, name, "exp_avg.pt"))}


def _agree(rank: int, result: Any) -> Any:
    """Rank 0's ``result`` on every rank (a barrier too); a plain return outside a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return result
    box = [result if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def refuse_unsafe_checkpoint(tag_dir: str) -> None:
    """ConfigError if a pickle in the checkpoint (sub-folders included: a universal copy keeps one
    folder per parameter) needs more than plain data to load.

    DeepSpeed unpickles its checkpoint files with ``weights_only=False``, so a file planted in a
    shared or synced checkpoint dir (``--remote-sync``) would run code on resume.  The pickles
    are read, not run, against the allow-list ``--pretrained`` uses for DeepSpeed checkpoints;
    ``--trust-checkpoint`` skips the check.
    """
    from .pretrained import refuse_unsafe_pickles

    try:
        refuse_unsafe_pickles(tag_dir)
    except ConfigError as e:
        raise ConfigError(f"cannot resume from {tag_dir}: {e}") from None


def prepare_resume(ckpt_dir: str, tag: str, world: int, rank: int, trust: bool = False) -> tuple[str, str, dict]:
    """Where to load ``ckpt_dir/tag`` from on a job of ``world`` ranks.

    First the checkpoint's pickles are vetted (``refuse_unsafe_checkpoint``; ``trust`` skips
    that).  Returns ``(load_dir, load_tag, ds_config_overrides)``.  The same world size, or a
    checkpoint without ZeRO optimizer shards (ZeRO-0 loads anywhere), gives the inputs back
    and ``{}``.  Otherwise rank 0 converts the checkpoint to the universal format (once; a
    finished conversion is reused) while the other ranks wait, and every rank gets the
    converted location plus ``{"checkpoint": {"load_universal": True}}`` to merge into the
    DeepSpeed config before ``deepspeed.initialize``.  Collective when a conversion is needed:
    call it on every rank.  Raises ConfigError (on every rank) when the conversion fails.
    """
    tag_dir = os.path.join(ckpt_dir, tag)
    if not trust:
        refuse_unsafe_checkpoint(tag_dir)
    manifest = read_manifest(tag_dir)
    saved = saved_world_size(tag_dir, manifest)
    stage = int(manifest.get("zero_stage", 1))
    if saved == world or stage == 0:
        return ckpt_dir, tag, {}
    out_tag = universal_tag(tag)
    out_dir = os.path.join(ckpt_dir, out_tag)
    outcome: tuple[str, str] = ("ok", "")
    if rank == 0:
        try:
            if is_converted(out_dir, tag_dir):
                if not trust:  # a copy found on disk was not made by this job: vet it like the tag
                    refuse_unsafe_checkpoint(out_dir)
                note = f"reusing its universal copy {out_dir}"
            else:
                seconds = convert_to_universal(tag_dir, out_dir)
                note = f"converted it (DeepSpeed universal checkpoint, ZeRO-{stage}) in {seconds:.1f}s: {out_dir}"
            outcome = ("ok", f"[dsclip] {tag} was saved by {saved} ranks, this job has {world}; {note}")
        except ConfigError as e:
            outcome = ("error", str(e))
        except Exception as e:  # noqa: BLE001 - every rank must learn of the failure, not hang
            why = f"{type(e).__name__}: {e}"
            outcome = ("error", f"converting {tag_dir} to a universal checkpoint failed ({why}); resume with {saved} ranks")
    status, message = _agree(rank, outcome)
    if status != "ok":
        raise ConfigError(message)
    if rank == 0:
        print(message, flush=True)
    return ckpt_dir, out_tag, copy.deepcopy(UNIVERSAL_OVERRIDES)


@contextlib.contextmanager
def universal_load(engine, load_dir: str, load_tag: str) -> Iterator[None]:
    """Wrap ``engine.load_checkpoint(load_dir, load_tag)``; for anything but a conversion made by
    ``prepare_resume`` it does nothing.  For a conversion it puts back the frozen weights and
    buffers (see ``_non_optimized_state``) and works around three problems of DeepSpeed
    0.19.8's universal loaders:

    - ZeRO-1/2 expect every rank to hold part of every parameter group.  A rank whose share of
      a small group (dsclip's ``logit_scale`` group has one element) is only padding fails with
      an IndexError; such a rank's groups are loaded here instead, leaving its padding-only
      shares without optimizer state (the optimizer creates zeros at the next step).
    - ZeRO-3 copies parameter group 0's settings into every group, which would give the
      no-decay group weight decay and every tower group the first group's lr.  The groups get
      their own settings back afterwards: the freshly built optimizer holds them, from the same
      config.
    - ZeRO-3 puts one and the same ``step`` tensor into the state of every sub-group.  Adam
      increments it in place, once per sub-group, so from the second step on each sub-group
      would see a different, wrong step count (and bias correction).  Each state gets its own.
    """
    path = os.path.join(load_dir, load_tag)
    if not os.path.isfile(os.path.join(path, MARKER)):
        yield
        return
    if not engine.zero_optimization():  # without ZeRO, DeepSpeed would load nothing at all from it
        raise ConfigError(f"{path} is a re-sharded (universal) checkpoint, which only a ZeRO-1/2/3 job can load; "
                          f"resume with ZeRO-1 or higher, or with the world size that saved it")
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    lp_groups = getattr(opt, "bit16_groups", None)
    patched = lp_groups is not None and any(
        not any(getattr(lp, "_hp_mapping", None) is not None for lp in group) for group in lp_groups)
    if patched:
        opt.load_hp_checkpoint_state_from_checkpoint_dir = types.MethodType(_load_allowing_padding_only, opt)
    try:
        yield
    finally:
        if patched:
            del opt.load_hp_checkpoint_state_from_checkpoint_dir
    for group, own in zip(base.param_groups, settings):
        group.update(own)
    for state in base.state.values():
        if hasattr(state.get("step"), "clone"):
            state["step"] = state["step"].clone()
    if os.path.isfile(os.path.join(path, EXTRAS)):
        _restore_non_optimized(engine.module, os.path.join(path, EXTRAS))


def _restore_non_optimized(module, path: str) -> None:
    import deepspeed
    import torch

    saved = torch.load(path, weights_only=True)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in saved and not p.requires_grad:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                    p.data.copy_(saved[name].reshape(p.shape))
        for name, b in module.named_buffers():
            if name in saved:
                b.copy_(saved[name].reshape(b.shape))


def _load_allowing_padding_only(opt, lp_groups_name: str, checkpoint_dir: str) -> None:
    """ZeRO-1/2: load this rank's fragments of every parameter from ``checkpoint_dir/zero``
    (one folder per parameter), skipping groups of which this rank holds only padding."""
    import torch
    from deepspeed.utils.tensor_fragment import map_to_flat_opt_states

    zero_dir = os.path.join(checkpoint_dir, "zero")
    common = torch.load(os.path.join(zero_dir, "optimizer_state.pt"), weights_only=False)
    opt._load_global_state(common)
    state = opt.optimizer.state
    for group, saved, lps in zip(opt.optimizer.param_groups, common["param_groups"], getattr(opt, lp_groups_name)):
        held = [lp for lp in lps if lp._hp_mapping is not None]
        keys: set[str] = set()
        step = None
        for lp in held:  # no tensor or expert parallelism in dsclip: one slice, index 0
            step = lp.load_hp_checkpoint_state(os.path.join(zero_dir, opt.param_names[lp]), 0, 1)
            keys.update(lp._hp_mapping.get_optim_state_keys())
        if held:
            flat = group["params"][0]
            if step is not None:
                state[flat]["step"] = step
            map_to_flat_opt_states(flat, lps, state, keys)
        group.update({k: v for k, v in saved.items() if k != "params"})


def merge_config(ds: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``ds`` with ``overrides`` merged in, section by section (a new dict)."""
    out = copy.deepcopy(ds)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
