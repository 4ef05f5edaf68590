"""``dsclip export``: consolidate a ZeRO checkpoint into one open_clip-loadable file.

The result has open_clip's key names and shapes, so
``open_clip.create_model_and_transforms(model, pretrained=OUT)`` loads it with strict keys.
Needs no GPU and no process group.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from . import checkpoint as ckpt
from .config import ConfigError


def consolidated_state_dict(ckpt_dir: str, tag: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights of one checkpoint, with open_clip's key names and shapes.

    DeepSpeed's files are unpickled with ``weights_only=False``, so unless ``trust`` they are first
    vetted: a checkpoint dir may come from anywhere (a shared disk, ``--remote-sync``), and a
    pickle that imports more than plain data could run code on load."""
    tag_dir = os.path.join(ckpt_dir, tag)
    if not trust:
        from .pretrained import refuse_unsafe_pickles

        refuse_unsafe_pickles(tag_dir)
    meta = ckpt.read_meta(tag_dir)
    stage = int(meta.get("zero_stage", 2))
    if stage == 0:
        states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)  # vetted above (or trusted)
        sd = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    else:
        import contextlib

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.ExitStack() as stack:
            if os.path.isdir(os.path.join(tag_dir, "offloaded_tensors")):
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=".export-", dir=ckpt_dir))
                ckpt_dir = with_offloaded_fp32(tag_dir, tmp)
            null = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(null))
            stack.enter_context(contextlib.redirect_stderr(null))  # chatty progress bars
            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    shapes = meta.get("param_shapes", {})
    out = {}
    for k, v in sd.items():
        if k in shapes:
            v = v.reshape(shapes[k])
        elif k not in meta.get("state_keys", sd.keys()):
            continue  # non-persistent buffers that DeepSpeed recorded; open_clip does not save them
        out[k] = v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
    missing = [k for k in meta.get("state_keys", []) if k not in out]
    if missing:
        raise RuntimeError(f"checkpoint {tag_dir} lacks {len(missing)} keys, e.g. {missing[:5]}")
    return out


def with_offloaded_fp32(tag_dir: str, tmp: str) -> str:
    """A checkpoint dir under ``tmp`` that DeepSpeed's consolidation can read, for a ZeRO-Infinity
    (NVMe offload) checkpoint.

    There, each swapped sub-group's fp32 partition is not in the optimizer file (an empty tensor
    stands in for it) but in ``offloaded_tensors/rankNN/<ds_id>.tensor.swp``, raw fp32 that
    DeepSpeed copies next to the checkpoint.  The copy's optimizer files have those partitions
    filled in; the model files are linked."""
    import glob
    import math
    import re

    tag = os.path.basename(os.path.normpath(tag_dir))
    out = os.path.join(tmp, tag)
    os.makedirs(out)
    with open(os.path.join(tmp, "latest"), "w") as fh:
        fh.write(tag)
    optim = sorted(glob.glob(os.path.join(tag_dir, "*_optim_states.pt")))
    world = len(optim)
    model_files = glob.glob(os.path.join(tag_dir, "*_model_states.pt"))
    for path in model_files:
        os.symlink(os.path.abspath(path), os.path.join(out, os.path.basename(path)))
    shapes = torch.load(model_files[0], map_location="cpu", weights_only=False)["param_shapes"]  # vetted by the caller
    for path in optim:
        rank = int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path)).group(1))
        state = torch.load(path, map_location="cpu", weights_only=False)
        groups = state["optimizer_state_dict"]["fp32_flat_groups"]
        for i, flat in enumerate(groups):
            if flat.numel() or not shapes[i]:
                continue
            numel = sum(math.ceil(s.numel() / world) for s in shapes[i].values())
            swp = os.path.join(tag_dir, "offloaded_tensors", f"rank{rank:02d}", f"{flat.ds_id}.tensor.swp")
            if not os.path.isfile(swp) or os.path.getsize(swp) < 4 * numel:
                raise RuntimeError(f"{tag_dir}: the NVMe-offloaded fp32 partition {swp} is missing or short; "
                                   "the checkpoint is incomplete")
            groups[i] = torch.from_file(swp, shared=False, size=numel, dtype=torch.float32).clone()
        torch.save(state, os.path.join(out, os.path.basename(path)))
    return tmp


def save_weights(sd: dict[str, torch.Tensor], out: str, model_cfg: dict | None = None) -> None:
    """Write ``.safetensors`` or ``.pt`` atomically (temp file, then rename).  A safetensors file
    carries ``model_cfg`` in its metadata: the grid its positional embedding was trained at goes
    wherever the file goes."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp.{os.getpid()}"
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        from .pretrained import MODEL_CONFIG_METADATA

        # at most one metadata key: safetensors writes them from a hash map, in another order in every
        # process, and an export must be byte-for-byte reproducible (a resumed run's equals the original's)
        metadata = {MODEL_CONFIG_METADATA: json.dumps(model_cfg, sort_keys=True)} if model_cfg else None
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)
    elif out.endswith((".pt", ".bin", ".pth")):
        torch.save(sd, tmp)
    else:
        raise ConfigError(f"unsupported export format {out!r}; use a .safetensors or .pt file name")
    os.replace(tmp, out)


def export(path: str, out: str, tag: str | None = None, trust: bool = False) -> str:
    """Export the checkpoint at ``path`` (run dir, checkpoints dir or tag dir) to ``out``; its
    pickles are vetted first unless ``trust``."""
    ckpt_dir, found_tag = ckpt.locate(path)
    tag = tag or found_tag
    try:
        tag = ckpt.resolve_tag(ckpt_dir, tag)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; pick a complete tag with --tag") from None
    if tag is None:
        raise ConfigError(f"no complete checkpoint under {ckpt_dir}; pass a run dir or a checkpoint dir")
    sd = consolidated_state_dict(ckpt_dir, tag, trust=trust)
    model_cfg = ckpt.read_meta(os.path.join(ckpt_dir, tag)).get("model_config")
    save_weights(sd, out, model_cfg)
    if model_cfg:
        side = os.path.splitext(out)[0] + ".model.json"
        ckpt.atomic_write_text(side, json.dumps(model_cfg, indent=2))
    return tag


def verify_export(path: str, model_name: str, cfg, probe: dict, save_to: str | None = None) -> float:
    """Reload ``path`` into a plain open_clip model and compare its embeddings of the probe batch
    with the engine's.  Returns the max abs difference; records inputs and outputs in ``save_to``."""
    import open_clip

    force = cfg.model.force_image_size
    force = None if not force else (force[0] if len(force) == 1 else tuple(force[:2]))
    model = open_clip.create_model(model_name, pretrained=path, force_image_size=force,
                                   force_context_length=cfg.model.force_context_length, output_dict=True)
    model.eval()
    with torch.no_grad():
        out = model(image=probe["image"], text=probe["text"])
    diff = max(float((out["image_features"] - probe["image_features"]).abs().max()),
               float((out["text_features"] - probe["text_features"]).abs().max()))
    if save_to:
        torch.save({**probe, "max_abs_diff": diff}, save_to)
    return diff


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsclip export",
                                description="Consolidate a dsclip/DeepSpeed checkpoint into one open_clip file.")
    p.add_argument("path", help="run dir, its checkpoints/ dir, or one checkpoint tag dir")
    p.add_argument("out", help="output file: .safetensors or .pt")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest complete)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="skip vetting the checkpoint's pickles; only for checkpoints you trust")
    args = p.parse_args(argv)
    try:
        tag = export(args.path, args.out, args.tag, trust=args.trust_checkpoint)
    except ConfigError as e:
        print(f"dsclip export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {tag} -> {args.out}")
    return 0
