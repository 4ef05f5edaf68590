"""``dsclip shards`` and ``write_shards``: output readable by dsclip and by plain webdataset."""

from __future__ import annotations

import json
import os

import pytest
import torch
import webdataset

from dsclip.data.shards import main, write_shards
from tests.test_data_wds import all_keys, cfg_for, image, source

torch.set_num_threads(1)


def image_folder(folder: str, n: int, size: int = 48) -> str:
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    for i in range(n):
        sub = "sub" if i % 3 == 0 else ""
        image(i, size).save(os.path.join(folder, sub, f"im{i:02d}.png" if i % 2 else f"im{i:02d}.jpg"))
        if i != 5:  # one image without a caption
            with open(os.path.join(folder, sub, f"im{i:02d}.txt"), "w") as fh:
                fh.write(f"caption {i}\n")
    return folder


def test_shards_cli_sidecar_captions_readable_by_both_readers(tmp_path, capsys, preprocess, tokenizer):
    src = image_folder(str(tmp_path / "images"), 11)
    out = str(tmp_path / "shards")
    assert main([src, out, "--samples-per-shard", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 10 samples in 3 shards" in printed and "no_caption 1" in printed
    with open(os.path.join(out, "sizes.json")) as fh:
        sizes = json.load(fh)
    assert sizes == {"shard-000000.tar": 4, "shard-000001.tar": 4, "shard-000002.tar": 2}

    url = os.path.join(out, "shard-{000000..000002}.tar")
    plain = list(webdataset.WebDataset(url, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png", "txt"))
    assert len(plain) == 10
    assert all(img.size == (48, 48) and txt.startswith("caption ") for _, img, txt in plain)
    metas = list(webdataset.WebDataset(url, shardshuffle=False).decode().to_tuple("json"))
    assert {m[0]["source"] for m in metas} >= {"im01.png", os.path.join("sub", "im00.jpg")}

    src_ = source(cfg_for(url), preprocess, tokenizer, batch_size=5)
    keys = [k for b in all_keys(src_) for k in b]
    assert src_.num_samples == 10 and len(set(keys)) == 10
    assert {k.split("/", 1)[1] for k in keys} == {key for key, _, _ in plain}


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_shards_cli_manifest_and_resize(tmp_path, kind):
    src = image_folder(str(tmp_path / "images"), 6, size=64)
    manifest = tmp_path / f"captions.{kind}"
    rows = [(f"{'' if i % 3 else 'sub/'}im{i:02d}.{'png' if i % 2 else 'jpg'}", f"text {i}") for i in range(6)]
    if kind == "csv":
        manifest.write_text("file,caption\n" + "".join(f"{p},{c}\n" for p, c in rows))
    else:
        manifest.write_text("".join(json.dumps({"image": p, "text": c, "extra": i}) + "\n"
                                    for i, (p, c) in enumerate(rows)))
    out = str(tmp_path / "out")
    main([src, out, "--samples-per-shard", "10", "--resize", "32", "--manifest", str(manifest), "--no-progress"])
    got = list(webdataset.WebDataset(os.path.join(out, "shard-000000.tar"), shardshuffle=False)
               .decode("pil").to_tuple("jpg", "txt", "json"))
    assert [t for _, t, _ in got] == [c for _, c in rows]
    assert all(img.size == (32, 32) for img, _, _ in got)
    if kind == "jsonl":
        assert [m["extra"] for _, _, m in got] == list(range(6))


def test_shards_cli_errors(tmp_path, capsys):
    # one line naming the problem and the fix, exit code 2, no traceback
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsclip: error: ") and "source folder not found" in err and err.count("\n") == 1
    src = image_folder(str(tmp_path / "images"), 2)
    bad = tmp_path / "m.csv"
    bad.write_text("a,b\nx,y\n")
    assert main([src, str(tmp_path / "out"), "--manifest", str(bad)]) == 2
    assert "--csv-img-key" in capsys.readouterr().err


def test_write_shards_is_deterministic_and_skips_bad_images(tmp_path):
    samples = [("a.1", image(1), "one"), ("b/2", b"garbage", "two"), ("c", image(3), " "), ("d", image(4), "four")]
    s1 = write_shards(iter(samples), str(tmp_path / "x"), 2)
    s2 = write_shards(iter(samples), str(tmp_path / "y" / "part-%03d.tar"), 2)
    assert s1.samples == 2 and s1.skipped == {"bad_image": 1, "no_caption": 1}
    with open(s1.shards[0], "rb") as a, open(s2.shards[0], "rb") as b:
        assert a.read() == b.read()
    assert os.path.basename(s2.shards[0]) == "part-000.tar"
    keys = [k for (k,) in webdataset.WebDataset(s1.shards[0], shardshuffle=False).to_tuple("__key__")]
    assert keys == ["a_1", "d"]  # dots and slashes in keys are made tar-safe


def test_shards_cli_writes_straight_to_s3(s3_server, s3_bucket, tmp_path, preprocess, tokenizer):
    src = image_folder(str(tmp_path / "images"), 9)
    main([src, f"s3://{s3_bucket}/shards/", "--samples-per-shard", "4", "--no-progress"])
    assert not any(p.name.endswith(".tar") for p in tmp_path.rglob("*"))  # no local copy
    names = sorted(o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert names == ["shards/shard-000000.tar", "shards/shard-000001.tar", "shards/sizes.json"]
    src_ = source(cfg_for(f"s3://{s3_bucket}/shards/shard-{{000000..000001}}.tar"), preprocess, tokenizer)
    assert src_.num_samples == 8
    assert len({k for b in all_keys(src_) for k in b}) == 8
