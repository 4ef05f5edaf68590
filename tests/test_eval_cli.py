"""`dsclip eval` on a saved tiny checkpoint: table, JSON, sidecar model config, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dsclip import cli, eval_cli
from tests.test_eval_helpers import TINY, make_image_folder, make_shards, read_json, tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    model, _, _ = tiny_model(seed=2)
    path = str(root / "tiny.safetensors")
    save_file(model.state_dict(), path)
    return root, path, model


def test_eval_checkpoint(ckpt, capsys):
    root, path, _ = ckpt
    folder = make_image_folder(str(root / "pets"))
    shards = make_shards(str(root / "cars"), n_classes=7)
    out = str(root / "out" / "metrics.json")
    rc = cli.main(
        [
            "eval",
            path,
            "--model",
            TINY,
            "--zeroshot-data",
            f"pets={folder},cars={shards}",
            "--dataset-type",
            "synthetic",
            "--val-num-samples",
            "16",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--out",
            out,
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert (
        "zeroshot/pets/top1" in printed
        and "val/text_to_image_R@5" in printed
        and "zeroshot/mean_top1" in printed
    )
    res = read_json(out)
    assert res["model"] == "tiny-clip" and res["checkpoint"] == path
    m = res["metrics"]
    assert m["zeroshot/pets/num_samples"] == 23 and m["zeroshot/cars/num_samples"] == 16
    assert 0 <= m["zeroshot/cars/top1"] <= m["zeroshot/cars/top5"] <= 1 and m["val/num_samples"] == 16


def test_weights_are_actually_loaded(ckpt, tmp_path):
    """Two different checkpoints give different numbers; the same one gives the same."""
    _, path, model = ckpt
    other = str(tmp_path / "other.safetensors")
    save_file(
        {
            k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in model.state_dict().items()
        },
        other,
    )
    args = [
        "--model",
        TINY,
        "--dataset-type",
        "synthetic",
        "--val-num-samples",
        "16",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ]
    results = []
    for p in (path, other, path):
        assert eval_cli.main([p, *args, "--out", str(tmp_path / "m.json")]) == 0
        results.append(read_json(tmp_path / "m.json")["metrics"]["val/loss"])
    assert results[0] == results[2] != results[1]


def test_sidecar_model_config(ckpt, tmp_path):
    _, path, _ = ckpt
    local = tmp_path / "export.safetensors"
    shutil.copy(path, local)
    shutil.copy(TINY, tmp_path / "export.model.json")  # what `dsclip export` writes beside its output
    assert (
        eval_cli.main(
            [
                str(local),
                "--dataset-type",
                "synthetic",
                "--val-num-samples",
                "8",
                "--batch-size",
                "8",
                "--workers",
                "0",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--dataset-type", "synthetic"], "--model is required"),
        (["--model", TINY], "nothing to evaluate"),
        (["--model", "WIDER", "--dataset-type", "synthetic"], "cannot load"),
        (["--model", TINY, "--zeroshot-data", "x=/does/not/exist"], "does not exist"),
        (["--model", TINY, "--bogus"], "unrecognized arguments"),
        (["--model", TINY, "--dataset-type", "synthetic", "--val-num-samples", "4"], "raise --val-num-samples"),
    ],
)
def test_errors_are_one_line(ckpt, capsys, args, msg):
    root, path, _ = ckpt
    if "WIDER" in args:  # the tiny architecture with another embedding width
        cfg = read_json(TINY)
        cfg["embed_dim"] = 48
        wider = root / "tiny-wider.json"
        wider.write_text(json.dumps(cfg))
        args = [str(wider) if a == "WIDER" else a for a in args]
    assert eval_cli.main([path, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1
