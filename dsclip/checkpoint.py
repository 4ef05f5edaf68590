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
import queue
import random
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .config import mask_url_credentials
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
    protect = (*protect, *uploading(ckpt_dir))  # a tag still going up to --remote-sync stays until it is there
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
#
# Rank 0 copies each complete tag on a background thread (``Uploader``), one tag at a time in the
# order they were saved, so training goes on while a checkpoint travels.  A tag stays protected
# from pruning until all of it is up (``prune`` asks ``uploading``), and ``latest`` follows its
# tag's manifest.  Transient errors are retried with backoff; refused credentials, a missing
# bucket or an outage longer than the retry budget end the run with one line (``RemoteSyncError``)
# at the next checkpoint or at the end, with every local checkpoint left in place.

# 0.5 s doubling, capped at 30 s: 10 retries ride out about 2.5 minutes of unreachable storage
UPLOAD_RETRIES, UPLOAD_BACKOFF, UPLOAD_MAX_BACKOFF = 10, 0.5, 30.0


class RemoteSyncError(RuntimeError):
    """The remote copy cannot go on.  The message is one line naming the cause and the fix."""


def _remote_fs(remote: str):
    if remote.startswith("s3://"):
        from .data.s3 import s3_endpoint, s3_filesystem

        return s3_filesystem(s3_endpoint()), remote[len("s3://"):].rstrip("/")
    import fsspec

    fs, path = fsspec.core.url_to_fs(remote)
    return fs, path.rstrip("/")


def _retrying(fn: Callable[[], Any], what: str, remote: str, retries: int, backoff: float,
              max_backoff: float) -> Any:
    """``fn()``, retried on transient storage errors; anything else becomes a ``RemoteSyncError``."""
    from .data.s3 import auth_failure, backoff_delays, is_permanent

    where = f"--remote-sync {mask_url_credentials(remote)}"
    delays = backoff_delays(retries, backoff, max_backoff)
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            error = mask_url_credentials(f"{type(e).__name__}: {e}".splitlines()[0][:200])
            why = auth_failure(e)
            if why is not None:
                raise RemoteSyncError(f"{where}: storage refused the credentials ({why}) while {what}; refresh "
                                      f"them (AWS_* variables, AWS_PROFILE or the instance role) and restart "
                                      f"with --resume latest") from None
            if isinstance(e, FileNotFoundError):
                raise RemoteSyncError(f"{where}: {error} while {what}; check that the bucket exists and the "
                                      f"URL names it") from None
            if is_permanent(e):
                raise RemoteSyncError(f"{where}: {error} while {what}; fix --remote-sync") from None
            if attempt == retries:
                raise RemoteSyncError(f"{where}: storage still failing after {retries} retries over "
                                      f"{sum(delays):.0f}s while {what} ({error}); restart with --resume "
                                      f"latest once it is reachable") from None
            print(f"[dsclip] remote sync: retrying in {delays[attempt]:g}s after {error} while {what} "
                  f"({attempt + 1}/{retries})", flush=True)
            time.sleep(delays[attempt])


def upload_checkpoint(ckpt_dir: str, tag: str, remote: str, retries: int = UPLOAD_RETRIES,
                      backoff: float = UPLOAD_BACKOFF, max_backoff: float = UPLOAD_MAX_BACKOFF) -> None:
    """Copy one complete tag to ``remote/checkpoints/<tag>/``, its manifest last, then the ``latest``
    pointer, so the remote copy is never ahead of its data (needs a checkpoint dir that holds every
    rank's files).  Raises ``RemoteSyncError``."""
    fs, base = _remote_fs(remote)
    tag_dir = os.path.join(ckpt_dir, tag)
    files = sorted(os.path.relpath(os.path.join(root, n), tag_dir) for root, _, names in os.walk(tag_dir)
                   for n in names)
    for rel in sorted(files, key=lambda rel: rel == MANIFEST):
        _retrying(lambda rel=rel: fs.put_file(os.path.join(tag_dir, rel), f"{base}/checkpoints/{tag}/{rel}"),
                  f"uploading {tag}/{rel}", remote, retries, backoff, max_backoff)
    _retrying(lambda: fs.pipe_file(f"{base}/checkpoints/{LATEST}", tag.encode()), f"uploading {LATEST}",
              remote, retries, backoff, max_backoff)


def download_latest(remote: str, ckpt_dir: str, retries: int = UPLOAD_RETRIES, backoff: float = UPLOAD_BACKOFF,
                    max_backoff: float = UPLOAD_MAX_BACKOFF) -> str | None:
    """Fetch the remote ``latest`` checkpoint into ``ckpt_dir``; returns its tag or None."""
    fs, base = _remote_fs(remote)

    def retrying(fn, what):
        return _retrying(fn, what, remote, retries, backoff, max_backoff)

    latest = f"{base}/checkpoints/{LATEST}"
    if not retrying(lambda: fs.exists(latest), f"looking for {LATEST}"):
        return None
    tag = retrying(lambda: fs.cat_file(latest), f"reading {LATEST}").decode().strip()
    remote_tag = f"{base}/checkpoints/{tag}"
    local_tag = os.path.join(ckpt_dir, tag)
    for path in retrying(lambda: fs.find(remote_tag), f"listing {tag}"):
        rel = path[len(remote_tag):].lstrip("/")
        os.makedirs(os.path.dirname(os.path.join(local_tag, rel)), exist_ok=True)
        retrying(lambda path=path, rel=rel: fs.get_file(path, os.path.join(local_tag, rel)), f"downloading {tag}/{rel}")
    if not is_complete(local_tag):
        raise RuntimeError(f"remote checkpoint {mask_url_credentials(remote)}/checkpoints/{tag} is incomplete")
    atomic_write_text(os.path.join(ckpt_dir, LATEST), tag)
    return tag


class Uploader:
    """Rank 0's background copy of complete tags to ``remote``, in the order they were saved.

    ``pending()`` is every tag submitted and not yet fully up; after a failure it keeps the failed
    tag and those queued behind it, which exist only locally.  ``error`` holds the failure."""

    def __init__(self, ckpt_dir: str, remote: str, retries: int = UPLOAD_RETRIES, backoff: float = UPLOAD_BACKOFF,
                 max_backoff: float = UPLOAD_MAX_BACKOFF):
        self.ckpt_dir, self.remote = ckpt_dir, remote
        self._retry = (retries, backoff, max_backoff)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._cancelled = False
        self.uploaded: list[str] = []
        self.error: RemoteSyncError | None = None
        self._thread = threading.Thread(target=self._run, name="dsclip-remote-sync", daemon=True)
        self._thread.start()

    def submit(self, tag: str) -> None:
        if self.error is not None:
            raise self.error
        with self._lock:
            self._pending.append(tag)
        self._queue.put(tag)

    def pending(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._pending)

    def _run(self) -> None:
        while (tag := self._queue.get()) is not None:
            if self.error is not None or self._cancelled:
                continue
            try:
                upload_checkpoint(self.ckpt_dir, tag, self.remote, *self._retry)
            except RemoteSyncError as e:
                self.error = e
            except Exception as e:  # noqa: BLE001 - e.g. a local file that vanished; reported like the rest
                self.error = RemoteSyncError(mask_url_credentials(
                    f"--remote-sync {self.remote}: {type(e).__name__}: {e} while uploading {tag}"))
            if self.error is None:
                self.uploaded.append(tag)
                with self._lock:
                    self._pending.remove(tag)
                print(f"[dsclip] uploaded {tag} to {mask_url_credentials(self.remote)}", flush=True)

    def wait(self) -> list[str]:
        """Block until every submitted tag is up; the tags uploaded.  Raises ``RemoteSyncError``."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.uploaded

    def cancel(self) -> None:
        """Stop after the file in flight, without waiting (the run is failing anyway)."""
        self._cancelled = True
        self._queue.put(None)


_UPLOADERS: dict[str, Uploader] = {}  # by real checkpoint dir: this process's uploads


def uploading(ckpt_dir: str) -> tuple[str, ...]:
    """Tags of ``ckpt_dir`` that are not yet fully copied to the remote (keep them locally)."""
    up = _UPLOADERS.get(os.path.realpath(ckpt_dir))
    return up.pending() if up is not None else ()


def sync_checkpoint(ckpt_dir: str, tag: str, remote: str, rank: int) -> None:
    """After a save, on every rank (collective): rank 0 queues ``tag`` for upload.  When an earlier
    upload failed, every rank raises its ``RemoteSyncError`` together, so that none is left
    waiting for rank 0 in the next collective."""
    import torch.distributed as dist

    failure = None
    if rank == 0:
        key = os.path.realpath(ckpt_dir)
        up = _UPLOADERS.get(key)
        if up is None:
            up = _UPLOADERS[key] = Uploader(ckpt_dir, remote)
        if up.error is not None:
            failure = str(up.error)
        else:
            if up.pending():  # uploads slower than checkpoints: say so, the local disk holds the backlog
                print(f"[dsclip] remote sync: {tag} waits for {', '.join(up.pending())} to finish uploading "
                      f"(kept locally until then)", flush=True)
            up.submit(tag)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure is not None:
        raise RemoteSyncError(failure)


def finish_uploads() -> None:
    """Wait for this process's uploads (the last checkpoint's, at the end of training)."""
    while _UPLOADERS:
        key, up = next(iter(_UPLOADERS.items()))
        if up.pending():
            print(f"[dsclip] waiting for {', '.join(up.pending())} to reach {mask_url_credentials(up.remote)}",
                  flush=True)
        try:
            up.wait()
        finally:
            _UPLOADERS.pop(key, None)


def cancel_uploads() -> None:
    """Abandon this process's uploads; what is already up stays valid (``latest`` goes last)."""
    while _UPLOADERS:
        _UPLOADERS.popitem()[1].cancel()
