"""WiSE-FT: weight-space ensembles of a zero-shot and a fine-tuned model.

For each alpha, ``theta = (1 - alpha) * theta_zeroshot + alpha * theta_finetuned``.  Alpha 0 and 1
return the input tensors themselves, so the endpoints reproduce the inputs bit for bit.  Every
alpha is evaluated (in-distribution: the validation set; out-of-distribution: the zero-shot
sets), the sweep is written as ``results.jsonl``, ``wiseft.csv`` and ``wiseft.png``, and the
alpha picked by ``--select`` is exported as an open_clip-loadable ``.safetensors``.

``dsclip wiseft --zeroshot A --finetuned B --alphas 0:1:0.1 --model M --val-data ... --zeroshot-data ...``
Inputs: ``.safetensors``/``.pt`` files with open_clip keys, dsclip run or checkpoint dirs, raw
DeepSpeed ZeRO checkpoint dirs, or (for ``--zeroshot``) an open_clip pretrained tag.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError

StateDict = dict[str, torch.Tensor]
DEFAULT_SELECT = "ood-within:1"


# ---------------------------------------------------------------- loading weights


def _dsclip_checkpoint(path: str, trust: bool = False) -> StateDict | None:
    """fp32 weights of a dsclip run dir, checkpoints dir or tag dir (None for anything else); its
    pickles are vetted unless ``trust``."""
    from . import checkpoint as ckpt

    ckpt_dir, tag = ckpt.locate(path)
    dsclip_tag = tag is not None and os.path.isfile(os.path.join(ckpt_dir, tag, ckpt.MANIFEST))
    if not (dsclip_tag or (tag is None and ckpt.complete_tags(ckpt_dir))):
        return None
    try:
        resolved = ckpt.resolve_tag(ckpt_dir, tag)
    except FileNotFoundError as e:
        raise ConfigError(f"{e}; pass a complete checkpoint") from None
    from .export import consolidated_state_dict

    return consolidated_state_dict(ckpt_dir, resolved, trust=trust)


def load_weights(path: str, model_name: str, trust: bool = False) -> StateDict:
    """A state dict with open_clip key names from a dsclip checkpoint dir, or anything
    ``--pretrained`` accepts: a weights file, a DeepSpeed ZeRO checkpoint dir, a pretrained tag.
    Pickles load as plain data (``weights_only``, or vetted before DeepSpeed's reader) unless
    ``trust``."""
    if os.path.isdir(path):
        sd = _dsclip_checkpoint(path, trust)
        if sd is not None:
            return sd
    from .pretrained import load_pretrained_state_dict

    return load_pretrained_state_dict(path, model_name, trust=trust)


def check_compatible(
    zs: StateDict,
    ft: StateDict,
    reference: StateDict | None = None,
    names: tuple[str, str] = ("zero-shot", "fine-tuned"),
) -> None:
    """Same keys and shapes (and, with ``reference``, those of the target model); ConfigError if not."""

    def describe(keys: set[str]) -> str:
        return ", ".join(sorted(keys)[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    pairs = [(names, zs, ft)]
    if reference is not None:
        pairs.append((("model", names[1]), reference, ft))
    for (a_name, b_name), a, b in pairs:
        if a.keys() != b.keys():
            only_a, only_b = set(a) - set(b), set(b) - set(a)
            what = []
            if only_a:
                what.append(f"only in {a_name}: {describe(only_a)}")
            if only_b:
                what.append(f"only in {b_name}: {describe(only_b)}")
            raise ConfigError(
                f"{a_name} and {b_name} weights have different keys ({'; '.join(what)}); "
                f"both must be the same open_clip architecture"
            )
        bad = [k for k in a if tuple(a[k].shape) != tuple(b[k].shape)]
        if bad:
            k = bad[0]
            raise ConfigError(
                f"{a_name} and {b_name} weights differ in shape at {k} ({tuple(a[k].shape)} vs "
                f"{tuple(b[k].shape)}; {len(bad)} tensors differ): a different architecture, image "
                f"size or context length; ensemble only weights of the same model"
            )


def match_scalar_shapes(sd: StateDict, reference: StateDict) -> StateDict:
    """Give 1-element tensors the reference's shape (``[1]`` from DeepSpeed vs open_clip's ``[]``)."""
    out = dict(sd)
    for k, v in sd.items():
        ref = reference.get(k)
        if ref is not None and v.shape != ref.shape and v.numel() == ref.numel() == 1:
            out[k] = v.reshape(ref.shape)
    return out


# ---------------------------------------------------------------- ensembling


def interpolate(zs: StateDict, ft: StateDict, alpha: float) -> StateDict:
    """``(1 - alpha) * zs + alpha * ft`` per tensor, computed in fp32 and stored in the fine-tuned
    dtype.  At alpha 0 and 1 the input tensors themselves are returned (bit-exact endpoints);
    non-float tensors come from whichever side alpha is closer to."""
    if alpha == 0:
        return dict(zs)
    if alpha == 1:
        return dict(ft)
    out = {}
    for k, b in ft.items():
        a = zs[k]
        if a.is_floating_point() and b.is_floating_point():
            out[k] = torch.lerp(a.float(), b.float(), alpha).to(b.dtype)
        else:
            out[k] = b if alpha >= 0.5 else a
    return out


def parse_alphas(spec: str) -> list[float]:
    """``start:stop:step`` (inclusive, e.g. ``0:1:0.1``), a comma list, or one number."""
    spec = spec.strip()
    try:
        if ":" in spec:
            parts = [float(p) for p in spec.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            n = math.floor((stop - start) / step + 1e-9) + 1
            alphas = [round(start + i * step, 10) for i in range(n)]
        else:
            alphas = [float(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(
            f"--alphas {spec!r} must be start:stop:step (e.g. 0:1:0.1) with step > 0, or a comma "
            f"list (e.g. 0,0.5,1)"
        ) from None
    if not alphas or not all(math.isfinite(a) for a in alphas):
        raise ConfigError(f"--alphas {spec!r} gives no finite alpha")
    return sorted(set(alphas))


# ---------------------------------------------------------------- choosing an alpha


def _minimise(metric: str) -> bool:
    lowered = metric.lower()
    return "loss" in lowered or "rank" in lowered


def default_metrics(metrics: dict[str, float]) -> tuple[str | None, list[str]]:
    """(in-distribution metric, out-of-distribution metrics) when not given: ID is the mean
    retrieval R@1 on the validation set if there is one, else the first zero-shot set's top-1;
    OOD is every other zero-shot set's top-1."""
    zs = [
        k for k in metrics if k.startswith("zeroshot/") and k.endswith("/top1") and k != "zeroshot/mean_top1"
    ]
    if "val/mean_R@1" in metrics:
        return "val/mean_R@1", zs
    if zs:
        return zs[0], zs[1:]
    return None, []


def select_alpha(rows: list[dict[str, Any]], criterion: str, id_metric: str | None) -> dict[str, Any]:
    """The chosen row.  Criteria: ``ood-within:X`` (best OOD among alphas whose ID is within X of
    the best ID; X in percentage points for accuracies/recalls, metric units for losses/ranks),
    ``id``, ``ood``, ``avg`` (mean of ID and OOD)."""
    sign = -1.0 if id_metric and _minimise(id_metric) else 1.0
    have_ood = all(r.get("ood") is not None for r in rows)
    have_id = all(r.get("id") is not None for r in rows)
    kind, _, arg = criterion.partition(":")
    if kind in ("ood", "ood-within", "avg") and not have_ood:
        kind = "id"  # nothing out-of-distribution was evaluated
    if kind in ("id", "ood-within", "avg") and not have_id:
        kind = "ood" if have_ood else "none"
    if kind == "none":
        return rows[-1]
    if kind == "id":
        return max(rows, key=lambda r: (sign * r["id"], -r["alpha"]))
    if kind == "ood":
        return max(rows, key=lambda r: (r["ood"], -r["alpha"]))
    if kind == "avg":
        return max(rows, key=lambda r: ((sign * r["id"] + r["ood"]) / 2, -r["alpha"]))
    if kind == "ood-within":
        try:
            tol = float(arg or 1.0)
        except ValueError:
            raise ConfigError(
                f"--select {criterion!r}: the tolerance must be a number, e.g. ood-within:1"
            ) from None
        if id_metric and not _minimise(id_metric):
            tol /= 100.0  # accuracies and recalls are fractions; the tolerance is in points
        best_id = max(sign * r["id"] for r in rows)
        ok = [r for r in rows if sign * r["id"] >= best_id - tol - 1e-12]
        return max(ok, key=lambda r: (r["ood"], sign * r["id"], -r["alpha"]))
    raise ConfigError(f"--select {criterion!r} is not one of ood-within:X, id, ood, avg")


# ---------------------------------------------------------------- the sweep


def state_dict_evaluator(model: torch.nn.Module, evaluator: Any) -> Callable[[StateDict], dict[str, float]]:
    """An ``eval_fn`` for ``run_wiseft_sweep``: load each ensemble into ``model`` (a plain open_clip
    model in this one process) and run every evaluation ``evaluator`` (an ``Evaluator`` built with
    rank 0, world 1, no group) has configured."""

    def eval_fn(sd: StateDict) -> dict[str, float]:
        model.load_state_dict(sd, strict=True)
        return evaluator.evaluate(model)

    return eval_fn


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    best: dict[str, Any]
    id_metric: str | None
    ood_metrics: list[str]
    exported: str | None
    files: dict[str, str]


def _alpha_tag(alpha: float) -> str:
    return f"{alpha:.4f}".rstrip("0").rstrip(".") if alpha != int(alpha) else str(int(alpha))


def run_wiseft_sweep(
    zs_sd: StateDict,
    ft_sd: StateDict,
    alphas: list[float],
    eval_fn: Callable[[StateDict], dict[str, float]] | None,
    out_dir: str,
    id_metric: str | None = None,
    ood_metrics: list[str] | None = None,
    select: str = DEFAULT_SELECT,
    export: bool = True,
    save_all: bool = False,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Evaluate every alpha with ``eval_fn(state_dict) -> metrics`` (None: no evaluation, one
    alpha), write the sweep files to ``out_dir`` and export the chosen alpha."""
    check_compatible(zs_sd, ft_sd)
    os.makedirs(out_dir, exist_ok=True)
    rows: list[dict[str, Any]] = []
    jsonl_path = os.path.join(out_dir, "results.jsonl")
    with open(jsonl_path, "w") as jsonl:
        for alpha in alphas:
            weights = interpolate(zs_sd, ft_sd, alpha)
            metrics = dict(eval_fn(weights)) if eval_fn is not None else {}
            if "val/image_to_text_R@1" in metrics and "val/text_to_image_R@1" in metrics:
                metrics["val/mean_R@1"] = (
                    metrics["val/image_to_text_R@1"] + metrics["val/text_to_image_R@1"]
                ) / 2
            if not rows and metrics and id_metric is None and ood_metrics is None:
                id_metric, ood_metrics = default_metrics(metrics)
            ood_metrics = ood_metrics or []
            for m in [id_metric, *ood_metrics]:
                if m is not None and metrics and m not in metrics:
                    raise ConfigError(
                        f"metric {m!r} was not evaluated; choose from {', '.join(sorted(metrics))}"
                    )
            row = {
                "alpha": alpha,
                "id": metrics.get(id_metric) if id_metric else None,
                "ood": (sum(metrics[m] for m in ood_metrics) / len(ood_metrics)) if ood_metrics else None,
                **metrics,
            }
            rows.append(row)
            jsonl.write(
                json.dumps({"kind": "wiseft", "id_metric": id_metric, "ood_metrics": ood_metrics, **row})
                + "\n"
            )
            jsonl.flush()
            shown = [f"{k} {row[k]:.4f}" for k in ("id", "ood") if row[k] is not None]
            log(f"[wiseft] alpha {alpha:g}: " + (" ".join(shown) or "not evaluated"))
            if save_all:
                _save(weights, os.path.join(out_dir, f"wiseft_alpha{_alpha_tag(alpha)}.safetensors"), alpha)
    best = select_alpha(rows, select, id_metric)
    files = {"results": jsonl_path, "csv": _write_csv(rows, os.path.join(out_dir, "wiseft.csv"))}
    if any(r["id"] is not None or r["ood"] is not None for r in rows):
        files["plot"] = _plot(rows, best, id_metric, ood_metrics or [], os.path.join(out_dir, "wiseft.png"))
    exported = None
    if export:
        exported = os.path.join(out_dir, f"wiseft_alpha{_alpha_tag(best['alpha'])}.safetensors")
        if not (save_all and os.path.isfile(exported)):
            _save(interpolate(zs_sd, ft_sd, best["alpha"]), exported, best["alpha"])
    summary = {
        "alpha": best["alpha"],
        "select": select,
        "id_metric": id_metric,
        "ood_metrics": ood_metrics or [],
        "id": best["id"],
        "ood": best["ood"],
        "weights": exported,
    }
    with open(os.path.join(out_dir, "wiseft_best.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    files["summary"] = os.path.join(out_dir, "wiseft_best.json")
    log(f"[wiseft] chose alpha {best['alpha']:g} by {select}" + (f"; weights {exported}" if exported else ""))
    return SweepResult(rows, best, id_metric, ood_metrics or [], exported, files)


def _save(sd: StateDict, path: str, alpha: float) -> None:
    """Atomic ``.safetensors`` with open_clip keys.  Tensors that are views into a larger buffer
    (consolidated ZeRO weights) are copied; safetensors refuses shared storage."""
    from safetensors.torch import save_file

    def own(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu().contiguous()
        return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()

    tmp = f"{path}.tmp.{os.getpid()}"
    # one metadata key: several would be written in a different order by every process
    save_file({k: own(v) for k, v in sd.items()}, tmp, metadata={"wiseft_alpha": repr(alpha)})
    os.replace(tmp, path)


def _write_csv(rows: list[dict[str, Any]], path: str) -> str:
    metric_keys = sorted({k for r in rows for k in r} - {"alpha", "id", "ood"})
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["alpha", "id", "ood", *metric_keys])
        for r in rows:
            w.writerow([r["alpha"], r["id"], r["ood"], *(r.get(k) for k in metric_keys)])
    return path


def _plot(
    rows: list[dict[str, Any]], best: dict[str, Any], id_metric: str | None, ood_metrics: list[str], path: str
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    alphas = [r["alpha"] for r in rows]
    if all(r["id"] is not None and r["ood"] is not None for r in rows):
        xs, ys = [r["id"] for r in rows], [r["ood"] for r in rows]
        ax.plot(xs, ys, "-o", color="tab:blue", markersize=4)
        for a, x, y in zip(alphas, xs, ys):
            ax.annotate(f"{a:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.plot(
            [best["id"]],
            [best["ood"]],
            "*",
            color="tab:red",
            markersize=14,
            label=f"chosen alpha {best['alpha']:g}",
        )
        ax.set_xlabel(f"in-distribution: {id_metric}")
        ax.set_ylabel(
            "out-of-distribution: "
            + (ood_metrics[0] if len(ood_metrics) == 1 else f"mean of {len(ood_metrics)} zero-shot top-1")
        )
        ax.set_title("WiSE-FT: in-distribution vs zero-shot accuracy across alpha")
    else:
        key, label = ("id", id_metric) if rows[0]["id"] is not None else ("ood", "zero-shot top-1 (mean)")
        ax.plot(alphas, [r[key] for r in rows], "-o", markersize=4)
        ax.plot(
            [best["alpha"]],
            [best[key]],
            "*",
            color="tab:red",
            markersize=14,
            label=f"chosen alpha {best['alpha']:g}",
        )
        ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
        ax.set_ylabel(label)
        ax.set_title("WiSE-FT sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    from .eval_cli import _Parser, add_eval_args

    p = _Parser(
        prog="dsclip wiseft",
        description="WiSE-FT weight-ensembling sweep: interpolate "
        "zero-shot and fine-tuned weights, evaluate each alpha, export the chosen one.",
    )
    p.add_argument(
        "--zeroshot", required=True, help="zero-shot weights: file, checkpoint dir or pretrained tag"
    )
    p.add_argument("--finetuned", required=True, help="fine-tuned weights: file or checkpoint dir")
    p.add_argument("--alphas", default="0:1:0.1", help="start:stop:step (inclusive) or a comma list")
    p.add_argument("--out", default="wiseft", help="output directory")
    p.add_argument(
        "--select",
        default=DEFAULT_SELECT,
        help="how to choose the exported alpha: ood-within:X (best "
        "zero-shot accuracy with ID within X points of the best ID), id, ood, avg",
    )
    p.add_argument(
        "--id-metric",
        default=None,
        help="in-distribution metric (default: val/mean_R@1 with "
        "--val-data, else the first zero-shot set's top1)",
    )
    p.add_argument(
        "--ood-metrics",
        default=None,
        help="comma list of out-of-distribution metrics, averaged "
        "(default: every other zero-shot set's top1)",
    )
    p.add_argument("--save-all", action="store_true", help="also write the weights of every alpha")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load pickles that need more than plain data; only for checkpoints you trust")
    p.add_argument("--no-export", dest="export", action="store_false", help="do not write the chosen weights")
    add_eval_args(p, model_required=False)
    return p


def main(argv: list[str] | None = None) -> int:
    from .eval_cli import build_eval_config, build_model

    try:
        args = build_parser().parse_args(argv)
        alphas = parse_alphas(args.alphas)
        model_arg = args.model or _sidecar_model(args.finetuned) or _sidecar_model(args.zeroshot)
        if not model_arg:
            raise ConfigError(
                "--model is required (an open_clip model name or model-config JSON) unless the "
                "fine-tuned weights have a .model.json beside them"
            )
        cfg = build_eval_config(args)
        model, preprocess, tokenizer, image_size, name = build_model(model_arg, None, args)
        reference = model.state_dict()
        zs = match_scalar_shapes(load_weights(args.zeroshot, name, args.trust_checkpoint), reference)
        ft = match_scalar_shapes(load_weights(args.finetuned, name, args.trust_checkpoint), reference)
        check_compatible(zs, ft)
        check_compatible(reference, zs, names=(f"model {name}", "zero-shot"))
        from .evaluate import Evaluator

        evaluator = Evaluator(cfg, tokenizer, preprocess, image_size, 0, 1, None, args.device)
        eval_fn = state_dict_evaluator(model, evaluator) if evaluator.enabled else None
        if eval_fn is None and len(alphas) > 1:
            raise ConfigError(
                "nothing to evaluate the alphas on; pass --val-data and/or --zeroshot-data "
                "(or a single --alphas value to just export it)"
            )
        ood = [m.strip() for m in args.ood_metrics.split(",")] if args.ood_metrics else None
        result = run_wiseft_sweep(
            zs,
            ft,
            alphas,
            eval_fn,
            args.out,
            args.id_metric,
            ood,
            args.select,
            export=args.export,
            save_all=args.save_all,
        )
    except ConfigError as e:
        print(f"dsclip wiseft: error: {e}", file=sys.stderr)
        return 2
    print(_table(result))
    return 0


def _sidecar_model(path: str) -> str | None:
    side = os.path.splitext(path)[0] + ".model.json"
    return side if os.path.isfile(path) and os.path.isfile(side) else None


def _table(result: SweepResult) -> str:
    lines = [f"{'alpha':>6}  {'ID':>8}  {'OOD':>8}"]
    for r in result.rows:
        cells = [
            f"{100 * r[k]:7.2f}%"
            if r[k] is not None and not (result.id_metric and k == "id" and _minimise(result.id_metric))
            else (f"{r[k]:8.4f}" if r[k] is not None else f"{'-':>8}")
            for k in ("id", "ood")
        ]
        mark = "  <- chosen" if r is result.best else ""
        lines.append(f"{r['alpha']:6.3g}  {cells[0]}  {cells[1]}{mark}")
    lines.append(f"ID: {result.id_metric}; OOD: {', '.join(result.ood_metrics) or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
