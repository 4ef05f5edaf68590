"""Zero-shot and retrieval metrics equal brute-force single-process references, on 1 and 2 ranks."""

from __future__ import annotations

import math
import os

import pytest
import torch

from dsclip.config import Config
from dsclip.evaluate import (
    Evaluator,
    evaluate_retrieval,
    evaluate_zeroshot,
    retrieval_metrics,
    zeroshot_classifier,
)
from dsclip.zeroshot_data import load_zeroshot_datasets
from tests.distributed import run_ranks
from tests.test_eval_helpers import (
    PairSource,
    make_image_folder,
    make_shards,
    reference_retrieval,
    reference_zeroshot,
    tiny_model,
)

N_PAIRS = 23


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    folder = make_image_folder(str(root / "folder"))
    shards = make_shards(str(root / "shards"), sizes=(7, 5, 4), n_classes=7)
    one_shard = make_shards(str(root / "one"), sizes=(9,), n_classes=7)
    model, _, _ = tiny_model(seed=1)
    weights = str(root / "tiny.pt")
    torch.save(model.state_dict(), weights)
    return {
        "folder": folder,
        "shards": shards,
        "one": one_shard,
        "weights": weights,
        "spec": f"fold={folder},sh={shards},one={one_shard}::templates={folder}/templates.txt",
    }


def _dummy(tok):
    return {"image": torch.zeros(1, 3, 32, 32), "text": tok([""])}


def _references(weights: str, spec: str) -> dict:
    model, pre, tok = tiny_model(weights=weights)
    model.eval()
    refs = {}
    for ds in load_zeroshot_datasets(spec, "", pre, 32):
        samples = [(x, int(y)) for xb, yb in ds.loader(0, 1, 1000) for x, y in zip(xb, yb)]
        refs[ds.name] = reference_zeroshot(model, tok, samples, ds.classnames, ds.templates)
    refs["retrieval"] = reference_retrieval(model, PairSource(N_PAIRS, 0, 1, 4, tok))
    return refs


def _evaluate(rank: int, world: int, weights: str, spec: str, pad_repeat: bool = False) -> dict:
    """Zero-shot and retrieval through the public functions; runs on any number of ranks."""
    import torch.distributed as dist

    group = dist.group.WORLD if world > 1 else None
    model, pre, tok = tiny_model(weights=weights)
    model.train()  # evaluation must switch to eval mode and back
    out = {}
    for ds in load_zeroshot_datasets(spec, "", pre, 32):
        w = zeroshot_classifier(
            model, tok, ds.classnames, ds.templates, "cpu", rank, world, group, batch_size=3
        )
        out[ds.name] = evaluate_zeroshot(model, ds, w, rank, world, group, batch_size=4)
    # uneven split: rank 0 has more batches, so rank 1 pads with blank forwards
    source = _UnevenPairs(N_PAIRS, rank, world, 4, tok, pad_repeat=pad_repeat)
    out["retrieval"] = evaluate_retrieval(model, source, rank, world, group, torch.device("cpu"), _dummy(tok))
    out["training"] = model.training
    return out


class _UnevenPairs(PairSource):
    def __init__(self, *args, pad_repeat: bool = False, **kw):
        super().__init__(*args, **kw)
        self.pad_repeat = pad_repeat

    def mine(self) -> list[int]:
        cut = [0, 15, self.n] if self.world == 2 else [0, self.n]
        idx = list(range(cut[self.rank], cut[self.rank + 1]))
        if self.pad_repeat and self.world == 2:  # a source that pads ranks by repeating samples
            idx = (idx + idx)[:15]
        return idx


def _assert_match(got: dict, ref: dict) -> None:
    for name, r in ref.items():
        g = got[name]
        for k, v in r.items():
            tol = 1e-5 if k == "loss" else 0
            assert math.isclose(g[k], v, rel_tol=tol, abs_tol=tol), (name, k, g[k], v)


def test_single_process_matches_reference(data):
    ref = _references(data["weights"], data["spec"])
    got = _evaluate(0, 1, data["weights"], data["spec"])
    _assert_match(got, ref)
    assert got["training"] is True
    assert got["fold"]["num_samples"] == 23 and got["sh"]["num_samples"] == 16
    assert 0 < got["sh"]["top5"] < 1, "7 classes: top-5 must not be trivially 1"


@pytest.mark.dist
def test_two_ranks_match_reference(data):
    ref = _references(data["weights"], data["spec"])
    results = run_ranks(_evaluate, 2, data["weights"], data["spec"], True, timeout=240)
    for got in results:
        _assert_match(got, ref)
    assert results[0] == results[1]


def test_retrieval_metrics_ties_and_siglip():
    # identical captions tie; ranks count strictly better candidates, so row order cannot matter
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    txt[3] = txt[2]
    m = retrieval_metrics(img, txt, 10.0)
    perm = torch.tensor([5, 3, 1, 0, 2, 4])
    shuffled = retrieval_metrics(img[perm], txt[perm], 10.0)
    assert math.isclose(m.pop("loss"), shuffled.pop("loss"), rel_tol=1e-6) and m == shuffled
    # SigLIP loss with a bias: -sum log sigmoid(z * (s * x.y + b)) / N
    logits = 10.0 * img @ txt.T - 2.0
    z = 2 * torch.eye(6) - 1
    ref = -torch.nn.functional.logsigmoid(z * logits).sum() / 6
    assert math.isclose(retrieval_metrics(img, txt, 10.0, -2.0)["loss"], ref.item(), rel_tol=1e-5)
    assert m["image_to_text_R@10"] == 1.0 and m["text_to_image_median_rank"] >= 1


def test_zeroshot_label_out_of_range(tmp_path):
    folder = make_image_folder(str(tmp_path / "f"), per_class=(2, 2), names=False)
    model, pre, tok = tiny_model()
    (ds,) = load_zeroshot_datasets(f"x={folder}", "", pre, 32)
    w = zeroshot_classifier(model, tok, ds.classnames, ds.templates[:2], "cpu")
    with pytest.raises(ValueError, match="outside"):
        evaluate_zeroshot(model, ds, w[:1], 0, 1, None, batch_size=4)


def _cfg(**eval_kw) -> Config:
    cfg = Config()
    for k, v in eval_kw.items():
        setattr(cfg.eval, k, v)
    cfg.optim.batch_size = 8
    cfg.data.workers = 0
    return cfg


def test_evaluator_schedule_and_metric_names(data):
    model, pre, tok = tiny_model(weights=data["weights"])
    cfg = _cfg(
        zeroshot_data=f"fold={data['folder']}", zeroshot_frequency=2, val_frequency=1, eval_every_n_steps=5
    )
    cfg.data.dataset_type, cfg.data.val_num_samples = "synthetic", 32
    ev = Evaluator(cfg, tok, pre, 32, 0, 1, None, "cpu")
    assert ev.should_run(False, 0, 0)  # baseline
    m = ev.run(model, 0, 0)
    assert {
        "zeroshot/fold/top1",
        "zeroshot/fold/top5",
        "val/loss",
        "val/image_to_text_R@1",
        "val/text_to_image_mean_rank",
        "val/image_to_text_median_rank",
    } <= set(m)
    assert m["val/num_samples"] == 32
    assert not ev.should_run(False, 0, 0)  # a step is evaluated once
    assert not ev.should_run(False, 0, 3)
    assert ev.should_run(False, 0, 5)
    assert set(ev.run(model, 5, 0)) == set(m)
    assert not ev.should_run(True, 1, 5)  # epoch end on an already evaluated step
    assert ev.should_run(True, 1, 6)  # epoch 1: val only (zero-shot every 2 epochs)
    only_val = ev.run(model, 6, 1)
    assert only_val and all(k.startswith("val/") for k in only_val)
    assert ev.should_run(True, 2, 12)
    assert "zeroshot/fold/top1" in ev.run(model, 12, 2)

    off = Evaluator(_cfg(baseline_eval=False), tok, pre, 32, 0, 1, None, "cpu")
    assert not off.enabled and not off.should_run(False, 0, 0) and off.run(model, 0, 0) == {}
    nobase = Evaluator(
        _cfg(zeroshot_data=f"fold={data['folder']}", baseline_eval=False), tok, pre, 32, 0, 1, None, "cpu"
    )
    assert not nobase.should_run(False, 0, 0) and nobase.should_run(True, 1, 3)


def test_evaluator_imagenet_builtin(tmp_path):
    # an ImageNet-layout folder with 1000 class folders uses the built-in names and templates
    root = tmp_path / "imagenet"
    for i in range(1000):
        (root / f"n{i:08d}").mkdir(parents=True)
    from tests.test_eval_helpers import draw

    draw(0, 0).save(root / "n00000000" / "a.png")
    draw(1, 0).save(root / "n00000001" / "b.png")
    _, pre, _ = tiny_model()
    (ds,) = load_zeroshot_datasets("", str(root), pre, 32)
    assert ds.name == "imagenet" and len(ds.classnames) == 1000 and len(ds.templates) == 80
    assert ds.classnames[0] == "tench" and ds.num_samples == 2
    os.rmdir(root / "n00000999")
    from dsclip.config import ConfigError

    with pytest.raises(ConfigError, match="999 class folders"):
        load_zeroshot_datasets("", str(root), pre, 32)


def test_evaluation_images_over_the_pixel_limit_are_refused_from_the_header(tmp_path, monkeypatch):
    """A decompression bomb in an evaluation set is never decoded: the header alone refuses it."""
    from PIL import Image

    import dsclip.zeroshot_data as Z

    folder = make_image_folder(str(tmp_path / "folder"), per_class=(1, 1))
    shards = make_shards(str(tmp_path / "shards"), sizes=(2,), n_classes=2)
    side = Image.open(next(p for p in (tmp_path / "folder").rglob("*.png"))).size
    decoded = []
    real_convert = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda im, *a, **k: decoded.append(im.size) or real_convert(im, *a, **k))
    for spec in (f"f={folder}", f"s={shards}/shard-{{000..000}}.tar"):
        (ds,) = load_zeroshot_datasets(spec, "", lambda im: torch.zeros(3, 2, 2), 32,
                                       max_pixels=side[0] * side[1] - 1)
        with pytest.raises(ValueError, match="--max-image-pixels"):
            next(ds.loader(0, 1, batch_size=2))
        (ds,) = load_zeroshot_datasets(spec, "", lambda im: torch.zeros(3, 2, 2), 32)  # default: fine
        _, labels = next(ds.loader(0, 1, batch_size=2))
        assert len(labels) == 2
    assert len(decoded) == 4  # only the images under the limit were decoded
    assert Z.DEFAULT_MAX_PIXELS == Config().data.max_image_pixels
