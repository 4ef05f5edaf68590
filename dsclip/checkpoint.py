"""Checkpoints: save, find, resume, and export to open_clip.

Layout: ``RUN/checkpoints/<tag>/`` is a DeepSpeed checkpoint plus dsclip's own files:
``rng_rank<R>.pt`` (each rank's RNG states) and ``dsclip_manifest.json`` (written last, listing
every file with its size).  ``RUN/checkpoints/latest`` names the newest *complete* tag and is
replaced atomically after the manifest exists, so a crash at any moment during a save leaves
the previous checkpoint and ``latest`` valid.  Resume verifies the manifest and falls back to the
newest complete tag if ``latest`` points at a damaged one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from typing import Any

import numpy as np
import torch

from .faultinject import save_fault, save_fault_inside

MANIFEST = "dsclip_manifest.json"
LATEST = "latest"


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    m = re.fullmatch(r"step_(\d+)", tag)
    return int(m.group(1)) if m else -1


def rng_state() -> dict[str, Any]:
    # plain containers only, so the file loads with weights_only=True
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_manifest(tag_dir: str, meta: dict[str, Any]) -> None:
    files = {}
    for root, _, names in os.walk(tag_dir):
        for n in names:
            if n == MANIFEST or ".tmp" in n:
                continue
            p = os.path.join(root, n)
            files[os.path.relpath(p, tag_dir)] = os.path.getsize(p)
    atomic_write_text(os.path.join(tag_dir, MANIFEST), json.dumps({"files": files, **meta}, indent=1))


def is_complete(tag_dir: str) -> bool:
    path = os.path.join(tag_dir, MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError):
        return False
    for rel, size in files.items():
        p = os.path.join(tag_dir, rel)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return True


def complete_tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    tags = [t for t in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, t))]
    tags = [t for t in tags if is_complete(os.path.join(ckpt_dir, t))]
    return sorted(tags, key=lambda t: (step_of(t), t))


def resolve_tag(ckpt_dir: str, tag: str | None = None) -> str | None:
    """The tag to load: ``tag`` if given, else what ``latest`` names if complete, else the newest
    complete tag (with a warning).  None if there is nothing complete."""
    if tag is not None:
        if not is_complete(os.path.join(ckpt_dir, tag)):
            raise FileNotFoundError(f"checkpoint {os.path.join(ckpt_dir, tag)} is missing or incomplete")
        return tag
    latest_path = os.path.join(ckpt_dir, LATEST)
    named = None
    if os.path.isfile(latest_path):
        with open(latest_path) as fh:
            named = fh.read().strip()
        if named and is_complete(os.path.join(ckpt_dir, named)):
            return named
    tags = complete_tags(ckpt_dir)
    if named:
        warnings.warn(f"checkpoint {named!r} named by {latest_path} is incomplete; "
                      f"falling back to {tags[-1] if tags else 'none'}", stacklevel=2)
    return tags[-1] if tags else None


def locate(path: str) -> tuple[str, str | None]:
    """Accept a run dir, its ``checkpoints/`` dir, or one tag dir; return (checkpoints dir, tag or None)."""
    path = path.rstrip("/")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    if os.path.isfile(os.path.join(path, MANIFEST)) or step_of(os.path.basename(path)) >= 0:
        return os.path.dirname(path), os.path.basename(path)
    return path, None


def save_checkpoint(engine, ckpt_dir: str, step: int, client_state: dict[str, Any], rank: int,
                    keep_last_n: int, meta: dict[str, Any], protect: tuple[str, ...] = ()) -> str:
    """Save on every rank (collective).  Returns the tag."""
    import torch.distributed as dist

    tag = tag_for(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    if rank == 0 and os.path.isdir(tag_dir):  # a torn save of this very step: start clean
        shutil.rmtree(tag_dir)
    dist.barrier()
    # DeepSpeed writes the model states, then each rank's optimizer states (ZeRO shards)
    with save_fault_inside(engine, "_save_zero_checkpoint", "before_optimizer_states", step):
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    save_fault("after_engine_save", step)
    rng_path = os.path.join(tag_dir, f"rng_rank{rank}.pt")
    torch.save(rng_state(), rng_path + ".tmp")
    os.replace(rng_path + ".tmp", rng_path)
    dist.barrier()
    if rank == 0:
        write_manifest(tag_dir, {"step": step, **meta})
        save_fault("before_latest", step)
        atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
        prune(ckpt_dir, keep_last_n, protect=protect)
    dist.barrier()
    return tag


def prune(ckpt_dir: str, keep_last_n: int, protect: tuple[str, ...] = ()) -> None:
    if keep_last_n <= 0:
        return
    tags = complete_tags(ckpt_dir)
    for t in tags[:-keep_last_n]:
        if t not in protect:
            shutil.rmtree(os.path.join(ckpt_dir, t), ignore_errors=True)
    # incomplete tags older than the newest complete one are debris from crashed saves
    newest = step_of(tags[-1]) if tags else -1
    for t in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, t)
        if os.path.isdir(p) and step_of(t) < newest and t not in tags and t not in protect:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: str, tag: str, rank: int) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG; returns the client state."""
    _, client_state = engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
    rng_path = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=True))
    return client_state


def read_meta(tag_dir: str) -> dict[str, Any]:
    with open(os.path.join(tag_dir, MANIFEST)) as fh:
        return json.load(fh)


# ---------------------------------------------------------------- remote copies (--remote-sync)

def _remote_fs(remote: str):
    if remote.startswith("s3://"):
        from .data.s3 import s3_endpoint, s3_filesystem

        return s3_filesystem(s3_endpoint()), remote[len("s3://"):].rstrip("/")
    import fsspec

    fs, path = fsspec.core.url_to_fs(remote)
    return fs, path.rstrip("/")


def upload_checkpoint(ckpt_dir: str, tag: str, remote: str) -> None:
    """Copy one complete tag to ``remote/checkpoints/<tag>/``, then the ``latest`` pointer last, so
    the remote copy is never ahead of its data (rank 0 only; needs a shared checkpoint dir)."""
    fs, base = _remote_fs(remote)
    tag_dir = os.path.join(ckpt_dir, tag)
    for root, _, names in os.walk(tag_dir):
        for n in sorted(names, key=lambda n: n == MANIFEST):  # the manifest goes up last
            local = os.path.join(root, n)
            fs.put_file(local, f"{base}/checkpoints/{tag}/{os.path.relpath(local, tag_dir)}")
    with fs.open(f"{base}/checkpoints/{LATEST}", "w") as fh:
        fh.write(tag)


def download_latest(remote: str, ckpt_dir: str) -> str | None:
    """Fetch the remote ``latest`` checkpoint into ``ckpt_dir``; returns its tag or None."""
    fs, base = _remote_fs(remote)
    latest = f"{base}/checkpoints/{LATEST}"
    if not fs.exists(latest):
        return None
    with fs.open(latest, "r") as fh:
        tag = fh.read().strip()
    remote_tag = f"{base}/checkpoints/{tag}"
    local_tag = os.path.join(ckpt_dir, tag)
    for path in fs.find(remote_tag):
        rel = path[len(remote_tag):].lstrip("/")
        os.makedirs(os.path.dirname(os.path.join(local_tag, rel)), exist_ok=True)
        fs.get_file(path, os.path.join(local_tag, rel))
    if not is_complete(local_tag):
        raise RuntimeError(f"remote checkpoint {remote_tag} is incomplete")
    atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
    return tag
