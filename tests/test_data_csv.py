"""CSV source: columns, relative paths, per-epoch shuffle, exact start_batch, rank split."""

from __future__ import annotations

import os

import pytest
import torch

from dsclip.config import ConfigError
from dsclip.data import build_source
from dsclip.data.csv import CsvSource
from tests.test_data_wds import cfg_for, image

torch.set_num_threads(1)


def make_csv(folder: str, rows: int, sep: str = "\t", bad: dict[int, str] | None = None) -> str:
    """Images under ``folder/img``; the CSV in ``folder`` names them relative to itself."""
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    bad = bad or {}
    lines = [sep.join(["filepath", "title"])]
    for i in range(rows):
        path = os.path.join(folder, "img", f"{i}.png")
        if bad.get(i) == "garbage":
            with open(path, "wb") as fh:
                fh.write(b"not a png")
        elif bad.get(i) != "missing":
            image(i).save(path)
        caption = "" if bad.get(i) == "empty" else f"picture {i}"
        lines.append(sep.join([f"img/{i}.png", caption]))
    csv_path = os.path.join(folder, "data.csv")
    with open(csv_path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return csv_path


def csv_source(path: str, preprocess, tokenizer, rank=0, world=1, batch_size=4, **data):
    cfg = cfg_for(path, dataset_type="csv", **data)
    return CsvSource(cfg, "train", preprocess, tokenizer, rank, world, batch_size)


def keys_of(src, epoch=0, start=0):
    return [b["keys"] for b in src.batches(epoch, start)]


@pytest.mark.parametrize("workers", [0, 2])
def test_csv_resume_shuffle_and_ranks(tmp_path, preprocess, tokenizer, workers):
    path = make_csv(str(tmp_path), 26)
    src = csv_source(path, preprocess, tokenizer, workers=workers)
    assert src.num_batches == 6
    full = list(src.batches(0))
    assert [len(b["keys"]) for b in full] == [4] * 6 and full[0]["image"].shape == (4, 3, 32, 32)
    for k in (1, 3):
        tail = list(src.batches(0, k))
        assert [b["keys"] for b in tail] == [b["keys"] for b in full[k:]]
        assert torch.equal(tail[0]["image"], full[k]["image"])
    assert keys_of(src, 1) != [b["keys"] for b in full]
    flat = [k for b in full for k in b["keys"]]
    assert len(set(flat)) == 24

    ranks = [csv_source(path, preprocess, tokenizer, rank=r, world=2, workers=workers) for r in range(2)]
    assert ranks[0].num_batches == ranks[1].num_batches == 3
    per_rank = [[k for b in keys_of(s) for k in b] for s in ranks]
    assert not set(per_rank[0]) & set(per_rank[1])
    # global batch n on 2 ranks holds the same samples as batches 2n and 2n+1 on 1 rank
    assert sorted(per_rank[0] + per_rank[1]) == sorted(flat)


def test_csv_bad_rows_are_replaced_and_counted(tmp_path, preprocess, tokenizer):
    path = make_csv(str(tmp_path), 8, sep=",", bad={1: "garbage", 2: "missing", 3: "empty"})
    src = csv_source(path, preprocess, tokenizer, csv_separator=",", batch_size=8, max_skip_fraction=1.0)
    (batch,) = list(src.batches(0))
    assert batch["image"].shape[0] == 8 and len(set(batch["keys"])) == 5
    assert src.stats()["by_kind"] == {"bad_image": 1, "missing_image": 1, "empty_caption": 1}


def test_csv_config_errors(tmp_path, preprocess, tokenizer):
    path = make_csv(str(tmp_path), 4)
    with pytest.raises(ConfigError, match="no column 'filepath'.*--csv-separator"):
        csv_source(path, preprocess, tokenizer, csv_separator=",")
    with pytest.raises(ConfigError, match="set --csv-caption-key"):
        csv_source(path, preprocess, tokenizer, csv_caption_key="caption")
    with pytest.raises(ConfigError, match="not found"):
        csv_source(str(tmp_path / "nope.csv"), preprocess, tokenizer)
    cfg = cfg_for(path)
    assert isinstance(build_source(cfg, "train", preprocess, tokenizer, (32, 32), 0, 1, 4), CsvSource)
