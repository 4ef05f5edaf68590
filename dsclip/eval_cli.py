"""``dsclip eval CKPT --model M``: zero-shot and retrieval evaluation of any open_clip checkpoint.

CKPT is anything open_clip loads (a weights file or a pretrained tag), a dsclip run or
checkpoint dir, or a raw DeepSpeed checkpoint dir.  ``--model`` is an open_clip model name or a
model-config JSON (registered under its file stem); it may be left out when an exported file
has its ``.model.json`` beside it.  Runs in one process on CPU or GPU, prints a table and
writes the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

from .config import Config, ConfigError


class ArgError(ConfigError):
    """A command-line mistake (reported in one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ArgError(f"{message} (see `{self.prog} --help`)")


def add_eval_args(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    """The model and data options shared by ``dsclip eval`` and ``dsclip wiseft``."""
    p.add_argument(
        "--model",
        required=False,
        default=None,
        help="open_clip model name or model-config JSON"
        + ("" if model_required else " (default: the weights' .model.json)"),
    )
    p.add_argument(
        "--zeroshot-data",
        default="",
        help="zero-shot sets: name=path[::classnames=F][::templates=F], "
        "comma-separated; path is a class-folder dir or WebDataset shards with cls",
    )
    p.add_argument(
        "--imagenet-val", default="", help="ImageNet val folder (built-in classnames and templates)"
    )
    p.add_argument(
        "--val-data", default="", help="image-text validation data for loss and retrieval (shards or CSV)"
    )
    p.add_argument(
        "--dataset-type",
        default="auto",
        choices=("auto", "synthetic", "webdataset", "csv"),
        help="kind of --val-data",
    )
    p.add_argument(
        "--val-num-samples", type=int, default=None, help="validation samples (default: sizes.json)"
    )
    p.add_argument("--csv-img-key", default="filepath", help="CSV column holding the image path")
    p.add_argument("--csv-caption-key", default="title", help="CSV column holding the caption")
    p.add_argument("--csv-separator", default="\t", help="CSV separator")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1 ..."
    )
    p.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="weights/activations dtype"
    )
    p.add_argument("--s3-endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument(
        "--allow-pipe-urls", action="store_true", help="accept pipe: URLs (they run a shell command)"
    )


def build_eval_config(args: argparse.Namespace) -> Config:
    cfg = Config()
    cfg.eval.zeroshot_data, cfg.eval.imagenet_val = args.zeroshot_data, args.imagenet_val
    d = cfg.data
    d.val_data, d.dataset_type, d.val_num_samples, d.workers = (
        args.val_data,
        args.dataset_type,
        args.val_num_samples,
        args.workers,
    )
    d.csv_img_key, d.csv_caption_key, d.csv_separator = (
        args.csv_img_key,
        args.csv_caption_key,
        args.csv_separator,
    )
    d.s3_endpoint_url, d.allow_pipe_urls = args.s3_endpoint_url, args.allow_pipe_urls
    cfg.optim.batch_size = args.batch_size
    if args.batch_size < 1 or args.workers < 0:
        raise ArgError("--batch-size must be >= 1 and --workers >= 0")
    return cfg


def _model_name(model: str) -> str:
    from .model import register_model

    return register_model(model)


def build_model(
    model_arg: str, ckpt: str | None, args: argparse.Namespace
) -> tuple[Any, Any, Any, tuple, str]:
    """(model, preprocess_val, tokenizer, image_size, name) in eval mode on ``args.device``, with
    ``ckpt``'s weights (None: the architecture only, weights loaded later by the caller)."""
    import open_clip

    from .model import image_size_of, to_open_clip_shapes

    name = _model_name(model_arg)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ArgError(f"--device {args.device!r} is not a device; use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgError("--device cuda but no GPU is visible; use --device cpu")
    pretrained = ckpt if ckpt and not os.path.isdir(ckpt) else None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, output_dict=True
        )
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:  # open_clip's ways of saying "mismatch"
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"cannot load {ckpt} into {name}: {reason}; check that --model matches the checkpoint"
        ) from None
    if ckpt and os.path.isdir(ckpt):
        from .wiseft import check_compatible, load_weights

        sd = to_open_clip_shapes(load_weights(ckpt, name), model.state_dict())
        check_compatible(model.state_dict(), sd, names=(f"model {name}", ckpt))
        model.load_state_dict(sd, strict=True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model = model.to(device=device, dtype=dtype).eval()
    return model, preprocess, open_clip.get_tokenizer(name), image_size_of(model), name


def format_table(metrics: dict[str, float]) -> str:
    width = max((len(k) for k in metrics), default=10)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ---------"]
    for k in sorted(metrics):
        v = metrics[k]
        shown = f"{v:.0f}" if k.endswith("num_samples") else f"{v:.4f}"
        lines.append(f"{k:<{width}}  {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(
        prog="dsclip eval", description="Zero-shot and retrieval evaluation of an open_clip checkpoint."
    )
    p.add_argument("checkpoint", help="weights file, pretrained tag, or dsclip/DeepSpeed checkpoint dir")
    add_eval_args(p, model_required=False)
    p.add_argument("--out", default="eval_results.json", help="where to write the metrics as JSON")
    try:
        args = p.parse_args(argv)
        from .wiseft import _sidecar_model

        model_arg = args.model or _sidecar_model(args.checkpoint)
        if not model_arg:
            raise ArgError("--model is required (an open_clip model name or model-config JSON)")
        cfg = build_eval_config(args)
        model, preprocess, tokenizer, image_size, name = build_model(model_arg, args.checkpoint, args)
        from .evaluate import Evaluator

        evaluator = Evaluator(cfg, tokenizer, preprocess, image_size, 0, 1, None, args.device)
        if not evaluator.enabled:
            raise ArgError("nothing to evaluate; pass --zeroshot-data, --imagenet-val and/or --val-data")
        metrics = evaluator.evaluate(model)
    except ConfigError as e:
        print(f"dsclip eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"checkpoint": args.checkpoint, "model": name, "metrics": metrics}, fh, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
