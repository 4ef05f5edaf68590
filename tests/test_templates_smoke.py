"""Every shipped template runs: a few steps of real training (1 rank, tiny model, synthetic data),
with the template's own strategy, optimizer, schedule and evaluation settings; only the model,
data and length are overridden.  The multilingual template gets a tiny Hugging Face text tower
(a 6-layer RoBERTa built from a local config and tokenizer), the LiT one a tiny timm trunk, and every
run a small zero-shot set of the synthetic classes, so the WiSE-FT templates really sweep and choose an alpha."""

from __future__ import annotations

import csv
import glob
import json
import os

import pytest

from tests.launch import ROOT, TINY, launch_many
from tests.test_guards_train import _synthetic_zeroshot_set
from tests.test_strategies_dist import TINY_CFG, _lit_model_config, _start_weights

TEMPLATES = sorted(glob.glob(os.path.join(ROOT, "dsclip", "templates", "*.yaml")))


def _name(template: str) -> str:
    return os.path.splitext(os.path.basename(template))[0]


def tiny_hf_model_config(folder) -> str:
    """An open_clip model config whose text tower is a 6-layer RoBERTa from a local config and a
    word-level tokenizer over the synthetic captions' words: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, RobertaConfig

    from dsclip.data.synthetic import COLOURS, SHAPES

    hf = folder / "tiny-roberta"
    words = ["<s>", "<pad>", "</s>", "<unk>", "a", *COLOURS, *SHAPES]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(hf)
    RobertaConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=18, pad_token_id=1).save_pretrained(hf)
    cfg = {"embed_dim": 32, "vision_cfg": TINY_CFG["vision_cfg"],
           "text_cfg": {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf), "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "hf_model_pretrained": False, "context_length": 16}}
    path = folder / "tiny-hf-clip.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _hf_start_weights(folder, model_json: str) -> str:
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(model_json)
    torch.manual_seed(1234)
    model = open_clip.create_model("tiny-hf-clip", pretrained_text=False)  # the local config, no weights to fetch
    start = folder / "start.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(start))
    return str(start)


def _template_args(folder, template: str, zeroshot: str) -> list[str]:
    name = _name(template)
    model_json = {"lit": _lit_model_config, "multilingual": tiny_hf_model_config}.get(name, lambda f: TINY)(folder)
    if name == "multilingual":
        start, trunk = _hf_start_weights(folder, model_json), None
    else:
        start, _, trunk = _start_weights(folder, model_json)
    args = ["--config", template, "--model", model_json, "--pretrained", start, "--dataset-type", "synthetic",
            "--train-data", "", "--train-num-samples", "16", "--batch-size", "4", "--epochs", "1",
            "--max-steps", "2", "--precision", "fp32", "--workers", "0", "--zeroshot-frequency", "0",
            "--val-frequency", "0", "--eval-every-n-steps", "0", "--no-baseline-eval", "--report-to", "",
            "--zeroshot-data", f"tiny={zeroshot}", "--logs-dir", str(folder), "--name", "run", "--threads", "1"]
    if name == "lit":
        args += ["--pretrained-image", trunk]
    return args


@pytest.fixture(scope="module")
def template_runs(tmp_path_factory):
    """Every template's run, one after another in one process."""
    root = tmp_path_factory.mktemp("templates")
    zeroshot = _synthetic_zeroshot_set(root / "zeroshot")
    runs = {}
    for t in TEMPLATES:
        (root / _name(t)).mkdir()
        runs[_name(t)] = _template_args(root / _name(t), t, zeroshot)
    results, _ = launch_many(runs, nproc=1, timeout=900)
    return root, results


@pytest.mark.parametrize("template", TEMPLATES, ids=_name)
def test_template_smoke_runs(template_runs, template):
    root, results = template_runs
    name = _name(template)
    assert results[name].returncode == 0, results[name].stdout[-3000:]
    assert "done: 2 steps" in results[name].stdout
    run = root / name / "run"
    assert (run / "final.safetensors").exists()
    with open(template) as fh:
        sweeps = "wise_ft_alphas" in fh.read()
    if sweeps:  # the sweep evaluated every alpha and chose one
        with open(run / "wiseft" / "wiseft.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert [float(r["alpha"]) for r in rows] == [round(0.1 * i, 1) for i in range(11)]
        assert all(r.get("zeroshot/tiny/top1") not in (None, "") for r in rows), rows[0]
        assert os.path.getsize(run / "wiseft" / "wiseft.png") > 0
        assert "chosen alpha" in results[name].stdout


def test_multilingual_template_trains_only_the_top_text_layers(template_runs):
    root, results = template_runs
    assert results["multilingual"].returncode == 0, results["multilingual"].stdout[-3000:]
    rows = json.loads((root / "multilingual" / "run" / "param_groups.json").read_text())
    trainable = {n for r in rows if not r["frozen"] for n in r["names"]}
    text = {n for n in trainable if n.startswith("text.")}
    assert not any(n.startswith("visual.") for n in trainable)  # image tower locked
    # lock_text_unlocked_layers 4 of 6: the top encoder layers train, the embeddings and layers 0-1
    # stay (their LayerNorms keep training, as open_clip does without --lock-text-freeze-layer-norm)
    weights = {n for n in text if "LayerNorm" not in n}
    layers = {int(n.split(".encoder.layer.")[1].split(".")[0]) for n in weights if ".encoder.layer." in n}
    assert layers == {2, 3, 4, 5}, sorted(layers)
    assert not any(".embeddings." in n for n in weights) and "text.proj.weight" in text
