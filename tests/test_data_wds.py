"""WebDataset source on local shards: resume, rank balance, mixing, bad input, config errors.

The helpers here (tiny shards, config, tokenizer) are shared by the other ``test_data_*`` files.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from dsclip.config import Config, ConfigError
from dsclip.data import build_source
from dsclip.data.readers import ShardPart, range_parts, sample_ranges, split_parts, stream_quotas
from dsclip.data.s3 import RetryingReader, ShardReadError
from dsclip.data.samples import caption_of, check_image_header, image_size
from dsclip.data.shards import write_shards
from dsclip.data.skips import DataError, SkipCounter
from dsclip.data.tar import iter_tar
from dsclip.data.wds import WebDatasetSource

torch.set_num_threads(1)


def image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def make_shards(folder: str, shards: int, per_shard: int, prefix: str = "s", size: int = 32,
                sizes_json: bool = True) -> str:
    """``shards`` tars of ``per_shard`` samples keyed ``{prefix}{n:05d}``; returns the brace URL."""
    samples = ((f"{prefix}{n:05d}", image(n, size), f"a photo number {n} from {prefix}")
               for n in range(shards * per_shard))
    write_shards(samples, folder, per_shard)
    if not sizes_json:
        os.remove(os.path.join(folder, "sizes.json"))
    return os.path.join(folder, f"shard-{{000000..{shards - 1:06d}}}.tar")


def cfg_for(train_data: str, **data) -> Config:
    cfg = Config()
    cfg.data.train_data = train_data
    cfg.data.shuffle_buffer = 16
    cfg.data.workers = 0
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@functools.cache
def shared_tokenizer():
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


@functools.cache
def shared_preprocess():
    return open_clip.image_transform(32, is_train=True)


def source(cfg: Config, preprocess, tokenizer, rank: int = 0, world: int = 1, batch_size: int = 4, **kw):
    return WebDatasetSource(cfg, "train", preprocess, tokenizer, rank, world, batch_size, **kw)


def all_keys(src, epoch: int = 0, start: int = 0) -> list[list[str]]:
    return [b["keys"] for b in src.batches(epoch, start)]


@pytest.fixture(scope="module")
def shards6(tmp_path_factory) -> str:
    return make_shards(str(tmp_path_factory.mktemp("shards6")), shards=6, per_shard=10)


# ---------------------------------------------------------------- resume and determinism


@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_resume_mid_epoch_matches_tail(shards6, preprocess, tokenizer, workers, resampled):
    cfg = cfg_for(shards6, workers=workers, dataset_resampled=resampled)
    src = source(cfg, preprocess, tokenizer)
    assert src.num_batches == 15
    full, saved = [], {}
    for batch in src.batches(1, 0):
        full.append(batch)
        if len(full) in (1, 4, 7):  # what a checkpoint after batch k keeps
            saved[len(full)] = copy.deepcopy(src.local_position())
    assert len(full) == src.num_batches
    resumed = source(cfg, preprocess, tokenizer)
    for k in (1, 4, 7):
        tail = list(src.batches(1, k))  # no saved position: the epoch is replayed up to batch k
        assert [b["keys"] for b in tail] == [b["keys"] for b in full[k:]]
        if k == 4:
            continue
        resumed.restore_local_position(saved[k]["streams"], [])
        again = list(resumed.batches(1, k))  # from the saved reader positions
        assert [b["keys"] for b in again] == [b["keys"] for b in full[k:]]
        assert torch.equal(again[0]["image"], full[k]["image"])
    streams = max(1, workers)
    assert resumed.stats()["restored_streams"] == sum(min(k, streams) for k in (1, 7))
    assert resumed.stats()["replayed_batches"] == 0
    # augmentation is seeded per batch, so even the random crops match
    tail = list(src.batches(1, 7))
    assert torch.equal(tail[0]["image"], full[7]["image"])
    assert torch.equal(tail[-1]["text"], full[-1]["text"])
    # a fresh source (a restarted job) gives the same epoch; another epoch differs
    again = source(cfg, preprocess, tokenizer)
    assert all_keys(again, 1, 3) == [b["keys"] for b in full[3:]]
    assert all_keys(again, 2) != [b["keys"] for b in full]


def test_resume_from_a_saved_position_rereads_only_what_it_references(tmp_path, preprocess, tokenizer, monkeypatch):
    from dsclip.data import wds

    url = make_shards(str(tmp_path), shards=10, per_shard=10)
    cfg = cfg_for(url, shuffle_buffer=4)
    src = source(cfg, preprocess, tokenizer)  # one stream, 25 batches of 4
    full, saved = [], None
    for batch in src.batches(0):
        full.append(batch["keys"])
        if len(full) == 20:
            saved = copy.deepcopy(src.local_position())
    # the record is plain data: it survives a weights_only load (as in a checkpoint)
    buf = io.BytesIO()
    torch.save(saved, buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    opened: list[str] = []
    real_open = wds.open_shard
    monkeypatch.setattr(wds, "open_shard", lambda url, *a: opened.append(os.path.basename(url)) or real_open(url, *a))
    assert all_keys(source(cfg, preprocess, tokenizer), 0, 20) == full[20:]
    replay_opened, opened[:] = list(opened), []
    resumed = source(cfg, preprocess, tokenizer)
    resumed.restore_local_position(saved["streams"], [saved["stats"]])
    assert all_keys(resumed, 0, 20) == full[20:]
    epoch_order = [os.path.basename(p.shard) for p in src.pipeline.stream_parts(0, 0, 1)]
    assert len(replay_opened) == 10  # the replay reads the whole epoch up to the resume point
    assert 1 <= len(opened) <= 3 and opened == epoch_order[-len(opened):]  # only the epoch's last shards
    # the counts go on from the checkpoint's: each raw sample counted once over both runs
    assert resumed.stats()["samples"] == src.stats()["samples"] == 100


def test_one_epoch_visits_every_sample_once(shards6, preprocess, tokenizer):
    # 12 batches of 5: each of the 2 worker streams reads 3 shards (30 samples) for 6 batches
    cfg = cfg_for(shards6, workers=2)
    src = source(cfg, preprocess, tokenizer, batch_size=5)
    keys = [k for b in all_keys(src) for k in b]
    assert len(keys) == len(set(keys)) == 60
    assert {k.split("/")[0] for k in keys} == {f"shard-{i:06d}.tar" for i in range(6)}
    # the shard order changes with the epoch and the samples are shuffled across shards
    assert keys[:8] != [k for b in all_keys(src, 1) for k in b][:8]
    assert len({k.split("/")[0] for k in keys[:8]}) > 1


def test_start_batch_past_the_end_yields_nothing(shards6, preprocess, tokenizer):
    src = source(cfg_for(shards6), preprocess, tokenizer)
    assert list(src.batches(0, src.num_batches)) == []


# ---------------------------------------------------------------- ranks


def test_two_ranks_uneven_shards_same_batch_count(tmp_path, preprocess, tokenizer):
    url = make_shards(str(tmp_path), shards=5, per_shard=10)
    # 40 samples per epoch of the 50: 5 batches on each rank, every sample at most once
    cfg = cfg_for(url, train_num_samples=40)
    ranks = [source(cfg, preprocess, tokenizer, rank=r, world=2) for r in range(2)]
    keys = [[k for b in all_keys(s) for k in b] for s in ranks]
    assert ranks[0].num_batches == ranks[1].num_batches == 5
    assert len(keys[0]) == len(keys[1]) == 20
    assert len(set(keys[0] + keys[1])) == 40

    # all 50 (sizes.json): 6 batches each; the per-shard counts split the epoch at sample
    # granularity (5 shards over 2 ranks), so no sample repeats and only 50 - 48 are left out
    ranks = [source(cfg_for(url), preprocess, tokenizer, rank=r, world=2) for r in range(2)]
    keys = [[k for b in all_keys(s) for k in b] for s in ranks]
    assert ranks[0].num_batches == ranks[1].num_batches == 6
    assert len(keys[0]) == len(keys[1]) == 24
    assert len(set(keys[0] + keys[1])) == 48
    assert all(s.stats()["repeated"] == 0 for s in ranks)

    # without per-shard counts the shards are dealt out whole: rank 1 (2 shards, 20 samples for
    # 24 slots) wraps around within its own epoch stream, repeating exactly 4 samples, counted
    os.remove(os.path.join(str(tmp_path), "sizes.json"))
    ranks = [source(cfg_for(url, train_num_samples=50), preprocess, tokenizer, rank=r, world=2) for r in range(2)]
    keys = [[k for b in all_keys(s) for k in b] for s in ranks]
    assert ranks[0].num_batches == ranks[1].num_batches == 6
    assert len(keys[0]) == len(keys[1]) == 24
    assert not set(keys[0]) & set(keys[1])
    short = min(keys, key=lambda ks: len(set(ks)))
    assert len(set(short)) == 20 and sum(n - 1 for n in Counter(short).values()) == 4
    assert sorted(s.stats()["repeated"] for s in ranks) == [0, 4]


def test_sample_ranges_split_the_epoch_at_sample_granularity():
    # quotas 8+8+4+4 of 30 samples: 6 spare, shared out as reserves; ranges are disjoint and contiguous
    ranges = sample_ranges(30, [8, 8, 4, 4])
    assert ranges == [(0, 10), (10, 10), (20, 5), (25, 5)]
    parts = range_parts(["a", "b", "c"], [12, 0, 18], 10, 10)
    assert parts == [ShardPart("a", start=10, stop=12), ShardPart("c", start=0, stop=8)]
    # quotas past the data run on around it
    assert range_parts(["a", "b"], [3, 3], 4, 5) == [ShardPart("b", start=1, stop=3), ShardPart("a", start=0, stop=3)]
    assert stream_quotas(5, 4, 2, 2) == [12, 8, 12, 8]


def test_fewer_shards_than_streams_split_samples(tmp_path, preprocess, tokenizer):
    url = make_shards(str(tmp_path), shards=1, per_shard=40)
    cfg = cfg_for(url, workers=2)
    # 4 streams (2 ranks x 2 workers) share the shard, each keeping every 4th sample
    ranks = [source(cfg, preprocess, tokenizer, rank=r, world=2, batch_size=5) for r in range(2)]
    keys = [k for s in ranks for b in all_keys(s) for k in b]
    assert len(keys) == len(set(keys)) == 40


def test_split_parts_strides_shared_shards():
    parts = [ShardPart("a"), ShardPart("b")]
    assert split_parts(parts, 2, 1) == [ShardPart("b")]
    shares = [split_parts(parts, 5, c) for c in range(5)]
    assert shares[0] == [ShardPart("a", 0, 3)] and shares[4] == [ShardPart("a", 2, 3)]
    assert shares[1] == [ShardPart("b", 0, 2)] and shares[3] == [ShardPart("b", 1, 2)]


# ---------------------------------------------------------------- mixing


def test_mixing_two_sources_follows_upsampling_factors(tmp_path, preprocess, tokenizer):
    a = make_shards(str(tmp_path / "a"), shards=4, per_shard=25, prefix="a", size=16)
    b = make_shards(str(tmp_path / "b"), shards=4, per_shard=25, prefix="b", size=16)
    cfg = cfg_for(f"{a}::{b}", dataset_resampled=True, train_data_upsampling_factors="1::0.5",
                  train_num_samples=5000)
    src = source(cfg, lambda im: torch.zeros(3, 2, 2), tokenizer, batch_size=100)  # proportions only
    counts = Counter(k.rsplit("/", 1)[1][0] for keys in all_keys(src) for k in keys)
    assert sum(counts.values()) == 5000
    assert abs(counts["a"] / 5000 - 2 / 3) < 0.03
    assert abs(counts["b"] / 5000 - 1 / 3) < 0.03


def test_upsampling_factors_need_resampling(tmp_path, preprocess, tokenizer):
    a = make_shards(str(tmp_path / "a"), shards=1, per_shard=8)
    cfg = cfg_for(f"{a}::{a}", train_data_upsampling_factors="1::0.5")
    with pytest.raises(ConfigError, match="--dataset-resampled"):
        source(cfg, preprocess, tokenizer)
    cfg = cfg_for(f"{a}::{a}", dataset_resampled=True, train_data_upsampling_factors="1")
    with pytest.raises(ConfigError, match="one factor per source"):
        source(cfg, preprocess, tokenizer)


# ---------------------------------------------------------------- bad input


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    image(seed).save(buf, format="JPEG")
    return buf.getvalue()


def _tar(path: str, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def bad_shards(folder: str) -> str:
    """good.tar (10 ok), mixed.tar (4 ok + one of each problem), cut.tar (truncated mid-member)."""
    os.makedirs(folder, exist_ok=True)
    good = [(f"g{i}.{ext}", data) for i in range(10) for ext, data in (("jpg", _jpeg(i)), ("txt", b"good"))]
    _tar(os.path.join(folder, "good.tar"), good)
    broken_pixels = _jpeg(99)
    broken_pixels = broken_pixels[:200] + bytes(len(broken_pixels) - 200)  # header fine, data zeroed
    mixed = [(f"m{i}.{ext}", data) for i in range(4) for ext, data in (("jpg", _jpeg(i)), ("txt", b"ok"))]
    mixed += [("garbage.jpg", b"this is not an image"), ("garbage.txt", b"caption"),
              ("empty.png", _jpeg(5)), ("empty.txt", b"  "),
              ("nocap.jpg", _jpeg(6)),
              ("json.jpg", _jpeg(7)), ("json.json", json.dumps({"caption": "from json"}).encode()),
              ("../evil.txt", b"escape"), ("/abs/evil.jpg", _jpeg(8))]
    _tar(os.path.join(folder, "mixed.tar"), mixed)
    _tar(os.path.join(folder, "cut.tar"), good)
    with open(os.path.join(folder, "cut.tar"), "r+b") as fh:
        fh.truncate(int(os.path.getsize(os.path.join(folder, "cut.tar")) * 0.45) + 100)  # mid-member
    return os.path.join(folder, "{good,mixed,cut}.tar")


def test_bad_input_is_counted_by_kind_and_shard(tmp_path, preprocess, tokenizer):
    url = bad_shards(str(tmp_path / "bad"))
    cfg = cfg_for(url, train_num_samples=12, max_skip_fraction=1.0)
    src = source(cfg, preprocess, tokenizer)
    before = set(os.listdir(tmp_path))
    keys = [k for b in all_keys(src) for k in b]
    assert len(keys) == 12
    stats = src.stats()
    by_shard = stats["by_shard"]
    assert by_shard["cut.tar"] == {"corrupt_tar": 1}
    assert by_shard["mixed.tar"] == {"bad_image": 1, "empty_caption": 1, "missing_caption": 1, "unsafe_member": 2}
    assert stats["by_kind"]["corrupt_tar"] == 1
    assert stats["skipped"] == 6
    assert set(os.listdir(tmp_path)) == before  # nothing was extracted anywhere
    assert not any("evil" in k for k in keys)


def test_undecodable_pixels_are_replaced_within_the_batch(tmp_path, preprocess, tokenizer):
    jpeg = _jpeg(1)
    broken = jpeg[: jpeg.index(b"\xff\xda") + 20]  # the header parses; the pixel data is cut
    members = [(f"k{i}.{ext}", data) for i in range(8) for ext, data in (("jpg", jpeg), ("txt", b"cap"))]
    members[2] = ("k1.jpg", broken)
    _tar(str(tmp_path / "one.tar"), members)
    cfg = cfg_for(str(tmp_path / "one.tar"), train_num_samples=8, max_skip_fraction=1.0)
    batches = list(source(cfg, preprocess, tokenizer, batch_size=8).batches(0))
    assert len(batches) == 1 and batches[0]["image"].shape == (8, 3, 32, 32)
    assert len(set(batches[0]["keys"])) == 7  # the broken one carries a copy of another sample
    assert batches[0]["stats"]["by_kind"] == {"bad_image": 1}


def test_oversized_images_are_skipped(tmp_path, preprocess, tokenizer):
    url = make_shards(str(tmp_path), shards=1, per_shard=8, size=40)
    cfg = cfg_for(url, max_image_pixels=32 * 32, max_skip_fraction=1.0, train_num_samples=4)
    src = source(cfg, preprocess, tokenizer)
    with pytest.raises(DataError, match="no usable sample"):
        list(src.batches(0))
    assert src.stats()["by_kind"]["too_large"] == 8


def test_skip_fraction_limit_names_the_worst_shard(tmp_path, preprocess, tokenizer):
    good = make_shards(str(tmp_path / "good"), shards=1, per_shard=100)
    members = []
    for i in range(40):
        members += [(f"b{i}.jpg", b"junk"), (f"b{i}.txt", b"caption")]
    _tar(str(tmp_path / "junk.tar"), members)
    cfg = cfg_for(f"{good}::{tmp_path / 'junk.tar'}", train_num_samples=140, max_skip_fraction=0.1,
                  shuffle_buffer=1)
    src = source(cfg, preprocess, tokenizer)
    with pytest.raises(DataError, match=r"junk\.tar \(bad_image 40\).*--max-skip-fraction"):
        list(src.batches(0))


def test_tar_cut_at_a_member_boundary_is_corrupt(tmp_path):
    members = [(f"k{i}.{ext}", data) for i in range(4) for ext, data in (("jpg", _jpeg(i)), ("txt", b"c"))]
    _tar(str(tmp_path / "t.tar"), members)
    with open(tmp_path / "t.tar", "rb") as fh:
        data = fh.read()
    whole = SkipCounter()
    assert len(list(iter_tar(io.BytesIO(data), "t", whole))) == 4 and whole.skipped == {}
    with tarfile.open(tmp_path / "t.tar") as tf:
        boundary = tf.getmembers()[4].offset  # the header of k2.jpg
    cut = SkipCounter()
    assert [s["__key__"] for s in iter_tar(io.BytesIO(data[:boundary]), "t", cut)] == ["k0"]
    assert cut.skipped == {"corrupt_tar": {"t": 1}}


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, "gz"])
def test_tar_reader_long_names_pax_and_gzip(fmt):
    long = "d/" + "x" * 150 + "/k0"
    buf = io.BytesIO()
    mode, tar_format = ("w:gz", tarfile.PAX_FORMAT) if fmt == "gz" else ("w", fmt)
    with tarfile.open(fileobj=buf, mode=mode, format=tar_format) as tf:
        tf.addfile(tarfile.TarInfo("d"), None)  # a directory-like entry with no data
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        for ext, data in (("jpg", _jpeg(0)), ("txt", "caption é".encode())):
            info = tarfile.TarInfo(f"{long}.{ext}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    counter = SkipCounter()
    samples = list(iter_tar(io.BytesIO(buf.getvalue()), "t", counter))
    assert [s["__key__"] for s in samples] == [long] and counter.skipped == {}
    assert samples[0]["txt"] == "caption é".encode() and samples[0]["jpg"] == _jpeg(0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_fast_image_size_matches_pil(fmt):
    for size, mode in (((37, 23), "RGB"), ((5, 300), "L"), ((64, 64), "RGBA")):
        if fmt == "JPEG" and mode == "RGBA":
            continue
        buf = io.BytesIO()
        Image.new(mode, size).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert image_size(buf.getvalue()) == size
    assert image_size(b"garbage") is None
    assert check_image_header(b"garbage", 10**6) == "bad_image"


def test_caption_from_txt_or_json():
    assert caption_of({"txt": b" hi "}) == ("hi", None)
    assert caption_of({"json": b'{"caption": "from json"}'}) == ("from json", None)
    assert caption_of({"json": b'{"other": 1}'}) == (None, "missing_caption")
    assert caption_of({"txt": b"\xff\xfe"}) == (None, "bad_caption")
    assert caption_of({}) == (None, "missing_caption")


def test_retrying_reader_resumes_at_offset():
    data = bytes(range(256)) * 64
    opened: list[int] = []
    fail_after = {4096, 9000}

    class Flaky:
        def __init__(self, offset: int):
            self.pos = offset
            opened.append(offset)

        def read(self, n):
            for f in sorted(fail_after):
                if self.pos >= f:
                    fail_after.discard(f)
                    raise ConnectionResetError("reset by peer")
            out = data[self.pos: self.pos + min(n, 1000)]
            self.pos += len(out)
            return out

        def close(self):
            pass

    retries: list[int] = []
    r = RetryingReader(Flaky, "s3://b/k", retries=2, backoff=0.001, size=len(data),
                       on_retry=lambda url, off, e: retries.append(off))
    got = b"".join(iter(lambda: r.read(700), b""))
    assert got == data
    assert opened[0] == 0 and all(o > 0 for o in opened[1:]) and len(opened) == 3
    assert retries == opened[1:]

    class Dead(Flaky):
        def read(self, n):
            raise TimeoutError("timed out")

    r = RetryingReader(Dead, "s3://b/k", retries=3, backoff=0.001)
    with pytest.raises(ShardReadError, match="3 retries"):
        r.read(10)

    class Missing(Flaky):
        def read(self, n):
            raise FileNotFoundError("gone")

    calls = []
    r = RetryingReader(Missing, "s3://b/k", retries=3, backoff=0.001, on_retry=lambda *a: calls.append(a))
    with pytest.raises(ShardReadError):
        r.read(10)
    assert calls == []  # permanent errors are not retried


# ---------------------------------------------------------------- URLs and config errors


def test_no_match_pipe_and_missing_sizes_are_config_errors(tmp_path, preprocess, tokenizer):
    url = make_shards(str(tmp_path / "d"), shards=2, per_shard=4, sizes_json=False)
    with pytest.raises(ConfigError, match="matches no shard"):
        source(cfg_for(str(tmp_path / "nothing-{0..3}.tar")), preprocess, tokenizer)
    with pytest.raises(ConfigError, match="do not exist.*fix the brace range"):
        source(cfg_for(str(tmp_path / "d" / "shard-{000000..000005}.tar"), train_num_samples=8),
               preprocess, tokenizer)
    with pytest.raises(ConfigError, match="--allow-pipe-urls"):
        source(cfg_for(f"pipe:cat {url}"), preprocess, tokenizer)
    with pytest.raises(ConfigError, match="pass --train-num-samples"):
        source(cfg_for(url), preprocess, tokenizer)
    with pytest.raises(ConfigError, match="unsupported URL scheme"):
        source(cfg_for("gs://bucket/x.tar"), preprocess, tokenizer)
    with pytest.raises(ConfigError, match="cannot fill one global batch"):
        source(cfg_for(url, train_num_samples=8), preprocess, tokenizer, batch_size=16)


def test_directory_pipe_and_len_file(tmp_path, preprocess, tokenizer):
    folder = str(tmp_path / "d")
    url = make_shards(folder, shards=2, per_shard=6, sizes_json=False)
    with open(os.path.join(folder, "__len__"), "w") as fh:
        fh.write("12\n")
    src = source(cfg_for(folder), preprocess, tokenizer)
    assert src.num_shards == 2 and src.num_samples == 12
    cfg = cfg_for(f"pipe:cat {url}", allow_pipe_urls=True, train_num_samples=12)
    keys = [k for b in all_keys(source(cfg, preprocess, tokenizer)) for k in b]
    assert len(set(keys)) == 12


def test_build_source_picks_webdataset(shards6, preprocess, tokenizer):
    cfg = cfg_for(shards6)
    src = build_source(cfg, "train", preprocess, tokenizer, (32, 32), 0, 1, batch_size=4)
    assert isinstance(src, WebDatasetSource) and src.num_samples == 60
    cfg.data.val_data = shards6
    val = build_source(cfg, "val", preprocess, tokenizer, (32, 32), 0, 1, batch_size=4)
    # validation is not shuffled: two calls give the file order
    first = [k for b in all_keys(val) for k in b]
    assert first == sorted(first)


def test_http_shards_stream_with_sizes(tmp_path, preprocess, tokenizer):
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    make_shards(str(tmp_path), shards=3, per_shard=8)
    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        src = source(cfg_for(f"{base}/shard-{{000000..000002}}.tar", workers=1), preprocess, tokenizer)
        assert src.num_samples == 24
        assert len({k for b in all_keys(src) for k in b}) == 24
        with pytest.raises(ConfigError, match="HTTP 404"):
            source(cfg_for(f"{base}/missing-{{0..2}}.tar"), preprocess, tokenizer)
    finally:
        server.shutdown()
        server.server_close()


def test_preflight_resolves_counts_and_refuses_bad_input_without_a_model(tmp_path, shards6):
    from dsclip.data import preflight
    from dsclip.data.synthetic import SyntheticSource

    got = preflight(cfg_for(shards6), "train", world=2, batch_size=4)
    assert (got.kind, got.num_samples, got.num_batches, got.num_shards) == ("webdataset", 60, 7, 6)
    assert source(cfg_for(shards6), None, None, plan=got.plan).num_samples == 60  # the plan is reusable
    assert preflight(cfg_for(shards6), "val") is None  # no --val-data
    with pytest.raises(ConfigError, match="matches no shard"):
        preflight(cfg_for(str(tmp_path / "nothing-{0..3}.tar")), "train")
    with pytest.raises(ConfigError, match="cannot fill one global batch of 64"):
        preflight(cfg_for(shards6), "train", world=4, batch_size=16)
    synthetic = Config()
    synthetic.data.train_num_samples = 10
    assert preflight(synthetic, "train", batch_size=4).num_batches == 2
    with pytest.raises(ConfigError, match="10 synthetic samples cannot fill one global batch of 16"):
        preflight(synthetic, "train", world=2, batch_size=8)
    with pytest.raises(ConfigError, match="raise --train-num-samples"):  # the source says the same
        SyntheticSource(10, 8, 0, 2, None, (8, 8))
    csv_cfg = cfg_for(str(tmp_path / "missing.csv"), dataset_type="csv")
    with pytest.raises(ConfigError, match="CSV file not found"):
        preflight(csv_cfg, "train")


def test_resume_with_other_data_settings_is_refused(shards6):
    from dsclip.data import check_resume_data

    saved = cfg_for(shards6, workers=2)
    assert check_resume_data(cfg_for(shards6, workers=2), saved.to_dict(), 2, 2) is None
    changed = cfg_for(shards6, workers=1, shuffle_buffer=8)
    changed.run.seed = 3
    with pytest.raises(ConfigError) as err:
        check_resume_data(changed, saved.to_dict(), 2, 2)
    message = str(err.value)
    assert "\n" not in message
    assert "--workers 1 (checkpoint: 2)" in message and "--shuffle-buffer 8 (checkpoint: 16)" in message
    assert "--seed 3 (checkpoint: 0)" in message and "resume with the checkpoint's values" in message
    # another world size: the global batch must match, and the sample order cannot stay exact
    other_world = cfg_for(shards6, workers=1)
    other_world.optim.batch_size = saved.optim.batch_size * 2
    note = check_resume_data(other_world, saved.to_dict(), 2, 1)
    assert "saved by 2 ranks" in note and "sample order differs" in note
    with pytest.raises(ConfigError, match="the global batch"):
        check_resume_data(cfg_for(shards6), saved.to_dict(), 2, 1)
    # synthetic data is a pure function of the global sample index: exact on any world size
    syn = Config()
    syn.optim.batch_size = 16
    saved_syn = Config()
    saved_syn.optim.batch_size = 8
    assert check_resume_data(syn, saved_syn.to_dict(), 2, 1) is None
