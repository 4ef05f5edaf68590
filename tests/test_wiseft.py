"""WiSE-FT: bit-exact endpoints, mismatch errors, sweep files, alpha selection, the CLI."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsclip import wiseft
from dsclip.config import ConfigError
from dsclip.wiseft import check_compatible, interpolate, parse_alphas, run_wiseft_sweep, select_alpha
from tests.test_eval_helpers import TINY, make_image_folder, read_json, read_jsonl, tiny_model


@pytest.fixture(scope="module")
def pair():
    zs = tiny_model(seed=0)[0].state_dict()
    ft = tiny_model(seed=1)[0].state_dict()
    return zs, ft


def test_endpoints_are_the_inputs(pair):
    zs, ft = pair
    assert all(interpolate(zs, ft, 0.0)[k] is zs[k] for k in zs)
    assert all(interpolate(zs, ft, 1.0)[k] is ft[k] for k in ft)
    mid = interpolate(zs, ft, 0.25)
    for k in zs:
        assert torch.allclose(mid[k], 0.75 * zs[k] + 0.25 * ft[k], atol=1e-6), k
    # bf16 fine-tuned weights: computed in fp32, stored in bf16
    ft16 = {k: v.bfloat16() for k, v in ft.items()}
    assert interpolate(zs, ft16, 0.5)["text_projection"].dtype == torch.bfloat16


def test_parse_alphas():
    a = parse_alphas("0:1:0.1")
    assert len(a) == 11 and a[3] == 0.3 and a[0] == 0.0 and a[-1] == 1.0
    assert parse_alphas("1,0, 0.5") == [0.0, 0.5, 1.0] and parse_alphas("0.7") == [0.7]
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    for bad in ("0:1", "1:0:0.1", "0:1:0", "a,b", ""):
        with pytest.raises(ConfigError):
            parse_alphas(bad)


def test_mismatched_weights_are_config_errors(pair, tmp_path):
    zs, ft = pair
    with pytest.raises(ConfigError, match="different keys.*only in fine-tuned: extra"):
        check_compatible(zs, {**ft, "extra": torch.zeros(1)})
    # a different image size changes the visual positional embedding
    cfg = read_json(TINY)
    cfg["vision_cfg"]["image_size"] = 64
    big = tmp_path / "tiny-clip-64.json"
    big.write_text(json.dumps(cfg))
    import open_clip

    open_clip.add_model_config(str(big))
    other = open_clip.create_model("tiny-clip-64").state_dict()
    with pytest.raises(ConfigError, match="visual.positional_embedding.*image size"):
        check_compatible(zs, other)
    with pytest.raises(ConfigError):
        run_wiseft_sweep(zs, other, [0.5], None, str(tmp_path / "out"))


def test_select_alpha_criteria():
    rows = [
        {"alpha": a, "id": i, "ood": o}
        for a, i, o in [
            (0.0, 0.50, 0.70),
            (0.3, 0.70, 0.68),
            (0.5, 0.795, 0.66),
            (0.7, 0.80, 0.60),
            (1.0, 0.81, 0.50),
        ]
    ]
    assert select_alpha(rows, "id", "val/mean_R@1")["alpha"] == 1.0
    assert select_alpha(rows, "ood", "val/mean_R@1")["alpha"] == 0.0
    assert (
        select_alpha(rows, "ood-within:1", "val/mean_R@1")["alpha"] == 0.7
    )  # 0.80 is within 1 point of 0.81
    assert select_alpha(rows, "ood-within:2", "val/mean_R@1")["alpha"] == 0.5
    assert select_alpha(rows, "avg", "val/mean_R@1")["alpha"] == 0.5
    # a loss as the ID metric is minimised
    loss_rows = [
        {"alpha": a, "id": i, "ood": o} for a, i, o in [(0.0, 3.0, 0.7), (0.5, 2.0, 0.6), (1.0, 1.9, 0.5)]
    ]
    assert select_alpha(loss_rows, "ood-within:0.2", "val/loss")["alpha"] == 0.5
    with pytest.raises(ConfigError):
        select_alpha(rows, "best", "val/mean_R@1")


def test_sweep_writes_files_and_exports_bit_exact(pair, tmp_path):
    zs, ft = pair
    d = ft["text_projection"] - zs["text_projection"]

    def eval_fn(sd):  # alpha read back off the weights; a rising ID curve and an inverted-U OOD curve
        a = round(float(((sd["text_projection"] - zs["text_projection"]) * d).sum() / (d * d).sum()), 4)
        return {
            "val/image_to_text_R@1": 0.4 + 0.4 * a,
            "val/text_to_image_R@1": 0.4 + 0.4 * a,
            "zeroshot/a/top1": 0.6 - (a - 0.3) ** 2,
            "zeroshot/b/top1": 0.5 - (a - 0.3) ** 2,
        }

    out = str(tmp_path / "sweep")
    res = run_wiseft_sweep(zs, ft, parse_alphas("0:1:0.1"), eval_fn, out, select="ood", log=lambda s: None)
    assert res.id_metric == "val/mean_R@1" and res.ood_metrics == ["zeroshot/a/top1", "zeroshot/b/top1"]
    assert res.best["alpha"] == 0.3
    lines = read_jsonl(os.path.join(out, "results.jsonl"))
    assert [r["alpha"] for r in lines] == parse_alphas("0:1:0.1") and all(
        r["kind"] == "wiseft" for r in lines
    )
    assert abs(lines[3]["ood"] - 0.55) < 1e-9 and abs(lines[10]["id"] - 0.8) < 1e-9
    with open(os.path.join(out, "wiseft.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11 and {"alpha", "id", "ood", "zeroshot/a/top1"} <= set(rows[0])
    with open(os.path.join(out, "wiseft.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = read_json(os.path.join(out, "wiseft_best.json"))
    assert summary["alpha"] == 0.3 and os.path.isfile(summary["weights"])

    # the endpoints exported are the inputs bit for bit
    for alpha, ref in ((0.0, zs), (1.0, ft)):
        r = run_wiseft_sweep(zs, ft, [alpha], None, str(tmp_path / f"end{alpha}"), log=lambda s: None)
        got = load_file(r.exported)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) and got[k].dtype == ref[k].dtype for k in ref)


def test_cli_end_to_end(pair, tmp_path, capsys):
    import open_clip

    from dsclip import eval_cli

    zs, ft = pair
    zs_path, ft_path = str(tmp_path / "zs.safetensors"), str(tmp_path / "ft.pt")
    save_file(zs, zs_path)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ft.items()}}, ft_path)  # open_clip_train style
    folder = make_image_folder(str(tmp_path / "pets"), per_class=(2, 2, 2))
    common = [
        "--model",
        TINY,
        "--zeroshot-data",
        f"pets={folder}",
        "--dataset-type",
        "synthetic",
        "--val-num-samples",
        "16",
        "--batch-size",
        "8",
        "--workers",
        "0",
    ]
    out = str(tmp_path / "wiseft")
    rc = wiseft.main(
        [
            "--zeroshot",
            zs_path,
            "--finetuned",
            ft_path,
            "--alphas",
            "0,0.5,1",
            "--out",
            out,
            "--select",
            "id",
            *common,
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "<- chosen" in printed
    rows = read_jsonl(os.path.join(out, "results.jsonl"))
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert rows[0]["id_metric"] == "val/mean_R@1" and rows[0]["ood_metrics"] == ["zeroshot/pets/top1"]
    summary = read_json(os.path.join(out, "wiseft_best.json"))
    model = open_clip.create_model("tiny-clip", pretrained=summary["weights"])  # open_clip loads the export
    assert set(model.state_dict()) == set(zs)

    # alpha 0 evaluated inside the sweep equals `dsclip eval` of the zero-shot file
    assert eval_cli.main([zs_path, *common, "--out", str(tmp_path / "e.json")]) == 0
    direct = read_json(tmp_path / "e.json")["metrics"]
    for k, v in direct.items():
        assert rows[0][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k

    # errors are one line and exit code 2
    capsys.readouterr()
    assert wiseft.main(["--zeroshot", zs_path, "--finetuned", str(tmp_path / "nope.pt"), *common]) == 2
    assert "not found" in capsys.readouterr().err
    assert (
        wiseft.main(["--zeroshot", zs_path, "--finetuned", ft_path, "--model", TINY, "--alphas", "0,1"]) == 2
    )
    assert "nothing to evaluate" in capsys.readouterr().err


def test_cli_refuses_a_planted_pickle_in_a_checkpoint_dir(pair, tmp_path, capsys):
    """dsclip run dirs are consolidated through DeepSpeed's reader (``weights_only=False``): their
    pickles are vetted first, and a payload never runs."""
    from tests.faults.test_hostile import _poisoned_tag

    zs, _ = pair
    zs_path = str(tmp_path / "zs.safetensors")
    save_file(zs, zs_path)
    sentinel = tmp_path / "payload-ran"
    _poisoned_tag(tmp_path, sentinel)
    out = tmp_path / "wiseft"
    argv = ["--zeroshot", zs_path, "--finetuned", str(tmp_path / "evil"), "--model", TINY, "--alphas", "1",
            "--out", str(out)]
    assert wiseft.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("dsclip wiseft: error:") and "io.open" in err[0], err
    assert "--trust-checkpoint" in err[0]
    assert not sentinel.exists() and not out.exists()
