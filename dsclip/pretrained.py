"""Every pretrained source, turned into an open_clip state dict.

``--pretrained`` may be an open_clip tag (downloaded through open_clip's own mechanism), a local
``.pt``/``.pth``/``.bin``/``.safetensors`` file, an open_clip training checkpoint
(``{"state_dict": ...}``, keys possibly prefixed ``module.``), a dsclip export, or a DeepSpeed
checkpoint directory.  ``--model local-dir:/path`` and ``--model hf-hub:org/repo`` carry config
and weights together.  ``--pretrained-image`` (LiT) names a timm model or a local timm checkpoint
for the image tower's trunk.

Pickles are loaded with ``weights_only=True`` unless the user passes ``--trust-checkpoint``: a
checkpoint that needs arbitrary classes to unpickle could run code, so it is refused before any
of it is executed.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import socket
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from dsclip.config import ConfigError

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
HF_HUB_PREFIX, LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"
HF_CONFIG_NAME = "open_clip_config.json"  # open_clip's name for a repo's config
MODEL_CONFIG_METADATA = "dsclip_model_config"  # safetensors metadata key of a dsclip export's model config

# Classes DeepSpeed pickles into its own checkpoint files.  They are plain data holders; anything
# else in a DeepSpeed checkpoint needs --trust-checkpoint.
_DEEPSPEED_SAFE_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "argparse.Namespace",
}
# Wrappers that put a prefix in front of every key (DDP, DeepSpeed engines, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def load_pretrained_state_dict(spec: str, model_name: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """The open_clip state dict named by ``--pretrained`` for ``model_name``.  ``hf-hub:org/repo``
    and ``local-dir:/path`` name the weights of such a repo (what ``--model`` with them loads)."""
    if not spec:
        raise ConfigError("no pretrained source given")
    if spec.startswith(HF_HUB_PREFIX):
        return _to_custom_text_if_needed(_load_hf_hub_weights(spec[len(HF_HUB_PREFIX):], trust), model_name)
    spec = spec.removeprefix(LOCAL_DIR_PREFIX)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if is_deepspeed_checkpoint(path):
            sd = load_deepspeed_checkpoint(path, trust=trust)
        else:
            weights = find_weights_in_dir(path)
            if weights is None:
                raise ConfigError(f"--pretrained {spec}: directory holds neither a DeepSpeed checkpoint nor a "
                                  f"weights file ({', '.join(WEIGHT_SUFFIXES)})")
            sd = load_checkpoint_file(weights, trust=trust)
    elif os.path.isfile(path):
        sd = load_checkpoint_file(path, trust=trust)
    elif os.sep in spec or spec.endswith(WEIGHT_SUFFIXES):
        raise ConfigError(f"--pretrained file not found: {spec}; pass an existing checkpoint or a pretrained tag")
    else:
        sd = _load_tag(spec, model_name, trust=trust)
    return _to_custom_text_if_needed(sd, model_name)


@dataclass
class ModelSource:
    """What ``--model`` names: an open_clip model name or model-config JSON to build, plus, for
    ``local-dir:``/``hf-hub:``, the repo's weights and its preprocessing settings."""

    model: str  # an open_clip model name, or a model-config JSON path (registered under its stem)
    weights: str | None = None  # a spec for load_pretrained_state_dict, or None
    preprocess: dict = field(default_factory=dict)  # the repo's preprocess_cfg (mean, std, ...)
    config: dict | None = None  # the repo's model_cfg: the configuration its weights were trained with


def resolve_model_source(model: str) -> ModelSource:
    """Where ``--model`` comes from.

    ``local-dir:/path`` reads ``/path/open_clip_config.json`` (open_clip's layout: ``model_cfg``
    plus ``preprocess_cfg``) and takes the weights file beside it.  ``hf-hub:org/repo`` fetches the
    same config through open_clip's own hub code (cached files load offline); its weights stay
    ``hf-hub:org/repo``, fetched only by whoever loads them (rank 0 alone under ZeRO-3).  The
    model config is written to a JSON file whose stem names the model, so
    ``open_clip.add_model_config`` registers it and dsclip builds, checks and loads the model like
    any other.  Anything else is returned as is, with no weights.
    """
    if model.startswith(LOCAL_DIR_PREFIX):
        root = os.path.expanduser(model[len(LOCAL_DIR_PREFIX):])
        if not root:
            raise ConfigError("--model local-dir: needs a path, e.g. local-dir:/models/my-clip")
        if not os.path.isdir(root):
            raise ConfigError(f"--model {model}: directory not found")
        cfg_path = os.path.join(root, HF_CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"--model {model}: no {HF_CONFIG_NAME} in {root} (open_clip's local-dir layout)")
        model_cfg, preprocess = _read_open_clip_config(cfg_path)
        stem = os.path.basename(os.path.normpath(root)) or "local-model"
        stem += "-" + hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:8]  # unique per directory
        weights = find_weights_in_dir(root)
        return ModelSource(_write_model_config(stem, model_cfg), weights, preprocess, model_cfg)
    if model.startswith(HF_HUB_PREFIX):
        repo = model[len(HF_HUB_PREFIX):].strip("/")
        if not repo:
            raise ConfigError("--model hf-hub: needs a repo id, e.g. hf-hub:timm/ViT-B-16-SigLIP")
        model_cfg, preprocess = _read_open_clip_config(_hf_hub_file(repo, HF_CONFIG_NAME, model))
        return ModelSource(_write_model_config("hf-hub-" + repo.replace("/", "--"), model_cfg),
                           model, preprocess, model_cfg)
    return ModelSource(model)


def check_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], allow_pos_embed_mismatch: bool = True) -> None:
    """Raise one ConfigError listing every missing, unexpected and mis-shaped key.

    Positional-embedding size differences are allowed (the high-resolution path resizes them),
    and so is ``[]`` vs ``[1]`` for ``logit_scale``/``logit_bias`` (DeepSpeed-safe parameters).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not _ignorable_missing(k)]
    unexpected = [k for k in sd if k not in expected and not _ignorable_unexpected(k)]
    misshaped = []
    for k, v in sd.items():
        if k not in expected or tuple(v.shape) == tuple(expected[k].shape):
            continue
        if v.numel() == 1 and expected[k].numel() == 1:
            continue
        if allow_pos_embed_mismatch and _is_pos_embed(k) and v.dim() == expected[k].dim():
            continue
        misshaped.append(f"{k} {list(v.shape)} vs model {list(expected[k].shape)}")
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        fix = "check that --model matches the checkpoint"
        if "logit_bias" in unexpected:
            fix = "the checkpoint was trained with SigLIP (it has logit_bias): pass --siglip, or " + fix
        raise ConfigError("pretrained weights do not fit the model (" + "; ".join(parts) + f"); {fix}")


def load_pretrained_image(model: nn.Module, spec: str, trust: bool = False) -> list[str]:
    """LiT: load ImageNet weights into the image tower's timm trunk (``model.visual.trunk``).

    ``spec`` is a timm model name (``vit_base_patch16_224.augreg_in21k``; needs the network or a
    warm Hugging Face cache) or a local timm checkpoint file.  The classifier head of the timm
    checkpoint is dropped; the open_clip projection head stays as initialised.
    """
    trunk = timm_trunk(model)
    sd, notes = image_tower_state_dict(trunk, spec, trust)
    trunk.load_state_dict(sd, strict=True)
    return notes


def timm_trunk(model: nn.Module) -> nn.Module:
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if trunk is None:
        raise ConfigError("--pretrained-image needs an image tower built from timm (model config with "
                          "vision_cfg.timm_model_name, e.g. the lit template's model)")
    return trunk


def image_tower_state_dict(trunk: nn.Module, spec: str, trust: bool = False) -> tuple[dict[str, torch.Tensor],
                                                                                    list[str]]:
    """``--pretrained-image``'s weights for ``trunk`` (keys and shapes checked, classifier dropped),
    with a note.  Only ``trunk``'s keys and shapes are read, so it may live on the meta device."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        weights = find_weights_in_dir(path)
        if weights is None:
            raise ConfigError(f"--pretrained-image {spec}: no weights file ({', '.join(WEIGHT_SUFFIXES)}) in it")
        sd = load_checkpoint_file(weights, trust=trust)
    elif os.path.isfile(path):
        sd = load_checkpoint_file(path, trust=trust)
    elif os.sep in spec or spec.endswith(WEIGHT_SUFFIXES):
        raise ConfigError(f"--pretrained-image file not found: {spec}")
    else:
        sd = _timm_hub_state_dict(spec)
    expected = trunk.state_dict()
    classifier = _classifier_keys(trunk, sd, expected)
    sd = {k: v for k, v in sd.items() if k not in classifier}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k} {list(v.shape)} vs model {list(expected[k].shape)}" for k, v in sd.items()
                 if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or misshaped:
        detail = "; ".join(f"{len(x)} {label}: {', '.join(x[:8])}" for label, x in
                           (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if x)
        raise ConfigError(f"--pretrained-image {spec} does not fit the timm trunk "
                          f"{type(trunk).__name__} ({detail}); check vision_cfg.timm_model_name")
    dropped = f" (dropped classifier {', '.join(sorted(classifier))})" if classifier else ""
    return sd, [f"loaded image-tower weights from {spec} into visual.trunk{dropped}"]


def recorded_model_config(spec: str) -> dict | None:
    """The open_clip model config a checkpoint records about itself, or None.

    dsclip exports carry it in their safetensors metadata and in a ``.model.json`` beside them,
    dsclip checkpoint tags in their manifest, and ``local-dir:``/``hf-hub:`` repos in
    ``open_clip_config.json``.  Plain weights files record nothing (their positional-embedding
    grid then comes from ``--model``'s config).
    """
    if not spec:
        return None
    try:
        if spec.startswith(HF_HUB_PREFIX):
            repo = spec[len(HF_HUB_PREFIX):].strip("/")
            return _read_open_clip_config(_hf_hub_file(repo, HF_CONFIG_NAME, spec))[0]
        if spec.startswith(LOCAL_DIR_PREFIX):
            spec = spec[len(LOCAL_DIR_PREFIX):]
            cfg_path = os.path.join(os.path.expanduser(spec), HF_CONFIG_NAME)
            if os.path.isfile(cfg_path):
                return _read_open_clip_config(cfg_path)[0]
    except ConfigError:
        return None
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if is_deepspeed_checkpoint(path):
            tag_dir = path if glob.glob(os.path.join(path, "*model_states.pt")) else _latest_tag_dir(path)
            return _json_or_none(os.path.join(tag_dir, "dsclip_manifest.json"), "model_config")
        path = find_weights_in_dir(path) or ""
    if not os.path.isfile(path):
        return None
    if path.endswith(".safetensors"):
        cfg = _safetensors_model_config(path)
        if cfg:
            return cfg
    return _json_or_none(os.path.splitext(path)[0] + ".model.json")


def _safetensors_model_config(path: str) -> dict | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as fh:
            text = (fh.metadata() or {}).get(MODEL_CONFIG_METADATA)
        cfg = json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - unreadable metadata records nothing; the load reports the file
        return None
    return cfg if isinstance(cfg, dict) and cfg else None


def _json_or_none(path: str, key: str | None = None) -> dict | None:
    try:
        with open(path) as fh:
            obj = json.load(fh)
    except (OSError, ValueError):
        return None
    if key is not None:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj if isinstance(obj, dict) and obj else None


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def load_checkpoint_file(path: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch pickle (plain or training checkpoint)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return strip_wrapper_prefix(load_file(path, device="cpu"))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    if not trust:
        _refuse_unsafe_pickle(path)
    if _is_torchscript(path):
        # OpenAI's original releases are TorchScript archives: TorchScript code, not pickled Python.
        obj = torch.jit.load(path, map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            obj.pop(key, None)
        return obj
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # noqa: BLE001 - torch.load has no single error type for bad files
        raise _load_error(path, e) from None
    return strip_wrapper_prefix(_unwrap(obj, path))


def _load_error(path: str, e: Exception) -> ConfigError:
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if "GLOBAL" in text or "Unsupported global" in text:
        # weights_only met a class or function it will not import: report which, not torch's essay
        detail = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported global" in ln), lines[-1])
        return ConfigError(f"{path}: refusing to unpickle, the file needs objects beyond plain tensors, which "
                           f"could run code on load ({detail[:160]}); convert it to safetensors, or pass "
                           f"--trust-checkpoint if you trust its source")
    detail = next((ln for ln in reversed(lines) if "error" in ln.lower() or "Unsupported" in ln),
                  lines[0] if lines else type(e).__name__)
    return ConfigError(f"{path}: cannot be loaded as a checkpoint ({type(e).__name__}: {detail[:200]})")


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "module", "model"):  # open_clip, DeepSpeed model states, timm/others
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors and len(tensors) == len(obj):
            return dict(tensors)
    raise ConfigError(f"{path}: no state dict found (expected a mapping of tensors or a checkpoint with "
                      f"'state_dict')")


def strip_wrapper_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` (DDP/DeepSpeed), ``_orig_mod.`` (torch.compile) or ``model.`` prefixes that
    every key shares."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def find_weights_in_dir(root: str) -> str | None:
    """The weights file of a model directory (open_clip and Hugging Face file names preferred)."""
    preferred = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "final.safetensors",
                 "model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin", "model.pt", "model.pth")
    for name in preferred:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    found = sorted(f for f in os.listdir(root) if f.endswith(WEIGHT_SUFFIXES))
    found.sort(key=lambda f: not f.endswith(".safetensors"))
    return os.path.join(root, found[0]) if found else None


def _is_torchscript(path: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _unsafe_globals(path: str) -> list[str]:
    """Globals a pickle would import on load, beyond what ``weights_only`` allows (read, not run)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) or foreign formats: let torch.load decide
        return []


def _refuse_unsafe_pickle(path: str, allowed: set[str] = frozenset()) -> None:
    if _is_torchscript(path):
        return
    bad = [g for g in _unsafe_globals(path) if g not in allowed]
    if bad:
        shown = ", ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")
        raise ConfigError(f"{path}: refusing to unpickle, the file needs {shown} to load, which could run code; "
                          f"convert it to safetensors, or pass --trust-checkpoint if you trust its source")


# ---------------------------------------------------------------------------------------------
# DeepSpeed checkpoint directories
# ---------------------------------------------------------------------------------------------


def is_deepspeed_checkpoint(path: str) -> bool:
    """A DeepSpeed ``save_checkpoint`` directory, or one of its tag sub-directories."""
    if not os.path.isdir(path):
        return False
    if glob.glob(os.path.join(path, "*model_states.pt")):
        return True
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as fh:
            tag = fh.read().strip()
        return bool(glob.glob(os.path.join(path, tag, "*model_states.pt")))
    return False


def load_deepspeed_checkpoint(path: str, trust: bool = False) -> dict[str, torch.Tensor]:
    """Consolidate a ZeRO-0/1/2/3 checkpoint into one fp32 state dict on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = os.path.abspath(path)
    if glob.glob(os.path.join(path, "*model_states.pt")):  # the tag directory itself
        root, tag = os.path.dirname(path), os.path.basename(path)
    else:
        root, tag = path, None
    tag_dir = os.path.join(root, tag) if tag else _latest_tag_dir(root)
    if not trust:
        refuse_unsafe_pickles(tag_dir)
    try:
        # DeepSpeed's reader unpickles with weights_only=False; the scan above vetted every file.
        with _quiet():
            sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises plain exceptions of many kinds
        raise ConfigError(f"{path}: cannot consolidate DeepSpeed checkpoint ({type(e).__name__}: {e})") from None
    return strip_wrapper_prefix({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})


def refuse_unsafe_pickles(directory: str) -> None:
    """ConfigError if any pickle under ``directory`` (DeepSpeed's ``*.pt`` files, sub-folders
    included) needs more than plain data and DeepSpeed's own data holders to load.  The pickles
    are read, not run; DeepSpeed itself loads them with ``weights_only=False``."""
    for f in sorted(glob.glob(os.path.join(directory, "**", "*.pt"), recursive=True)):
        _refuse_unsafe_pickle(f, allowed=_DEEPSPEED_SAFE_GLOBALS)


def _latest_tag_dir(root: str) -> str:
    with open(os.path.join(root, "latest")) as fh:
        return os.path.join(root, fh.read().strip())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        yield


# ---------------------------------------------------------------------------------------------
# open_clip tags, the Hugging Face Hub, timm
# ---------------------------------------------------------------------------------------------


def _load_tag(tag: str, model_name: str, trust: bool) -> dict[str, torch.Tensor]:
    import open_clip
    from open_clip import pretrained as ocp

    name = model_name.replace("/", "-")
    valid = open_clip.list_pretrained_tags_by_model(name)
    cfg = ocp.get_pretrained_cfg(name, tag)
    if not cfg:
        if valid:
            raise ConfigError(f"unknown pretrained tag {tag!r} for model {name}; valid tags: {', '.join(valid)} "
                              f"(or pass a local checkpoint path)")
        raise ConfigError(f"--pretrained {tag!r} is neither an existing file nor a pretrained tag; model {name} "
                          f"has no open_clip pretrained tags, so pass a local checkpoint path")
    try:
        with _offline_unless_reachable():
            path = ocp.download_pretrained(cfg)
    except Exception as e:  # noqa: BLE001 - urllib, huggingface_hub and OS errors all mean "not fetched"
        reason = "the download host cannot be reached (offline?)" if not _hub_reachable() else \
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
        raise ConfigError(f"could not download pretrained weights {tag!r} for {name}: {reason}; valid tags for "
                          f"{name}: {', '.join(valid)}; or pass a local checkpoint path") from None
    if not path:
        raise ConfigError(f"pretrained tag {tag!r} for {name} has no download location; valid tags: {', '.join(valid)}")
    return load_checkpoint_file(path, trust=trust)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a DNS lookup of the hub works: offline machines fail in milliseconds here instead
    of minutes of download retries.  With a proxy configured we cannot tell, so assume yes."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        socket.getaddrinfo(endpoint, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


@contextlib.contextmanager
def _offline_unless_reachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode while the hub is unreachable: cached files still load,
    misses fail at once."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old = constants.HF_HUB_OFFLINE
    if not old and not _hub_reachable():
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _hf_hub_file(repo: str, filename: str | None, what: str) -> str:
    """A file of a Hugging Face repo through open_clip's own download code (``filename`` None: the
    repo's weights, safetensors preferred); offline, only what the cache holds."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        with _offline_unless_reachable():
            return download_pretrained_from_hf(repo, filename=filename)
    except Exception as e:  # noqa: BLE001 - huggingface_hub, OS and network errors all mean "not fetched"
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE or not _hub_reachable():
            raise ConfigError(f"{what}: the Hugging Face Hub cannot be reached (offline?) and the repo's "
                              f"{filename or 'weights'} is not in the local cache; download it elsewhere and use "
                              f"--model local-dir:PATH") from None
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{what}: could not fetch {filename or 'the weights'} from the Hugging Face Hub "
                          f"({reason}); check the repo id") from None


def _load_hf_hub_weights(repo: str, trust: bool) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(_hf_hub_file(repo, None, f"hf-hub:{repo}"), trust=trust)


def _timm_hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        with _offline_unless_reachable():
            net = timm.create_model(name, pretrained=True, num_classes=0)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Unknown model" in repr(e):
            raise ConfigError(f"--pretrained-image {name!r}: unknown timm model; see timm.list_models()") from None
        raise ConfigError(f"--pretrained-image {name!r}: could not download timm weights (offline? "
                          f"{str(e).splitlines()[0][:160]}); pass a local timm checkpoint file instead") from None
    except Exception as e:  # noqa: BLE001 - network and hub errors of many types
        raise ConfigError(f"--pretrained-image {name!r}: could not download timm weights (offline? "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:160]}); pass a local timm checkpoint "
                          f"file instead") from None
    return net.state_dict()


def _classifier_keys(trunk: nn.Module, sd: dict, expected: dict) -> set[str]:
    """Keys of the timm checkpoint's classifier, which the open_clip trunk (num_classes=0) lacks."""
    names = getattr(trunk, "pretrained_cfg", {}).get("classifier") or "head"
    names = [names] if isinstance(names, str) else list(names)
    return {k for k in sd if k not in expected and any(k == n or k.startswith(n + ".") for n in names)}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _ignorable_missing(key: str) -> bool:
    # Buffers newer transformers versions create on their own.
    return key.endswith("embeddings.position_ids")


def _ignorable_unexpected(key: str) -> bool:
    return key.endswith("embeddings.position_ids")


def _is_pos_embed(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in ("positional_embedding", "pos_embed") or key.endswith("position_embeddings.weight")


def _to_custom_text_if_needed(sd: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """A standard-CLIP checkpoint loaded into a CustomTextCLIP model: move text keys under
    ``text.`` with open_clip's own converter."""
    if "positional_embedding" not in sd or not model_name:
        return sd
    try:
        import open_clip

        cfg = open_clip.get_model_config(model_name.replace("/", "-")) or {}
    except Exception:  # noqa: BLE001 - unknown names are checked elsewhere
        return sd
    custom = cfg.get("custom_text") or "hf_model_name" in cfg.get("text_cfg", {})
    if not custom:
        return sd
    from open_clip.model import convert_to_custom_text_state_dict

    return convert_to_custom_text_state_dict(sd)


def _write_model_config(stem: str, model_cfg: dict) -> str:
    """Write a repo's model config where ``add_model_config`` can pick it up; ``stem`` names it."""
    out_dir = os.path.join(tempfile.gettempdir(), "dsclip-model-configs")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{stem}.json")
    tmp = f"{out}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(model_cfg, fh)
    os.replace(tmp, out)  # every rank writes the same bytes; replace keeps readers safe
    return out


def _read_open_clip_config(path: str) -> tuple[dict, dict]:
    """``(model_cfg, preprocess_cfg)`` of an ``open_clip_config.json``."""
    with open(path) as fh:
        try:
            full = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    model_cfg = full.get("model_cfg") if isinstance(full, dict) else None
    if not isinstance(model_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict) \
            or not isinstance(model_cfg.get("text_cfg"), dict):
        raise ConfigError(f"{path}: missing 'model_cfg' with vision_cfg and text_cfg (open_clip's "
                          f"{HF_CONFIG_NAME} layout)")
    preprocess = full.get("preprocess_cfg") or {}
    return model_cfg, preprocess if isinstance(preprocess, dict) else {}
