"""WebDataset shards streamed from a real S3 endpoint (moto's server over HTTP, via s3fs)."""

from __future__ import annotations

import logging
import os
import re
import threading

import pytest
import torch

from dsclip.config import ConfigError
from dsclip.data import s3 as s3mod
from dsclip.data.s3 import RetryingReader
from dsclip.data.wds import WebDatasetSource
from tests.test_data_wds import all_keys, cfg_for, make_shards, source

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("s3src"))
    make_shards(folder, shards=5, per_shard=20, size=64)  # ~200 KB per shard: several range reads each
    return folder


@pytest.fixture
def s3_shards(s3_server, s3_bucket, local_shards) -> str:
    s3_server.upload_dir(local_shards, s3_bucket, "train")
    return f"s3://{s3_bucket}/train/shard-{{000000..000004}}.tar"


def test_streams_from_s3_with_endpoint_from_environment(s3_shards, preprocess, tokenizer):
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    src = source(cfg_for(s3_shards, workers=1), preprocess, tokenizer, batch_size=5)
    assert src.num_samples == 100  # from sizes.json in the bucket
    keys = [k for b in all_keys(src) for k in b]
    assert len(keys) == len(set(keys)) == 100
    # a prefix ending in '/' means every .tar under it
    bucket_prefix = s3_shards.rsplit("/", 1)[0] + "/"
    assert source(cfg_for(bucket_prefix), preprocess, tokenizer).num_shards == 5


def test_server_restart_mid_epoch_loses_nothing(s3_server, s3_shards, preprocess, tokenizer, monkeypatch, caplog):
    """The endpoint goes away while a shard is half read and comes back on the same port."""
    original = RetryingReader.read
    outage = threading.Event()

    def read(self, n=-1):
        data = original(self, n)
        if not outage.is_set() and self.pos > 0 and self.name.endswith("shard-000002.tar"):
            outage.set()
            s3_server.stop()
            threading.Timer(1.0, s3_server.start).start()
        return data

    monkeypatch.setattr(RetryingReader, "read", read)
    cfg = cfg_for(s3_shards, workers=0, shard_retries=6)
    src = source(cfg, preprocess, tokenizer, batch_size=5, block_size=16 << 10)
    with caplog.at_level(logging.WARNING, logger="dsclip.data.wds"):
        keys = [k for b in all_keys(src) for k in b]
    assert outage.is_set()
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 100  # all keys exactly once
    stats = src.stats()
    assert stats["retries"] >= 1 and stats["skipped"] == 0
    offsets = [int(m) for m in re.findall(r"shard-000002\.tar at byte (\d+)", caplog.text)]
    assert offsets and offsets[0] > 0  # resumed inside the shard, not from its start
    assert "testing" not in caplog.text  # credentials never reach the log


def test_shard_given_up_after_retries_is_counted(s3_server, s3_shards, preprocess, tokenizer, monkeypatch):
    """With one retry, a shard whose endpoint stays down is skipped and counted, not fatal."""
    original = RetryingReader.read
    timers: list[threading.Timer] = []

    def read(self, n=-1):
        data = original(self, n)
        if not timers and self.pos > 0 and self.name.endswith("shard-000001.tar"):
            s3_server.stop()
            timers.append(threading.Timer(3.0, s3_server.start))
            timers[0].start()
        return data

    monkeypatch.setattr(RetryingReader, "read", read)
    cfg = cfg_for(s3_shards, shard_retries=1, max_skip_fraction=1.0, train_num_samples=50)
    src = source(cfg, preprocess, tokenizer, batch_size=5, block_size=16 << 10)
    try:
        keys = [k for b in all_keys(src) for k in b]
    finally:
        for t in timers:
            t.join()
    assert timers and len(keys) == 50
    assert src.stats()["by_shard"]["shard-000001.tar"] == {"shard_failed": 1}


def test_missing_bucket_no_match_and_denied(s3_server, s3_bucket, s3_shards, preprocess, tokenizer, monkeypatch):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        source(cfg_for("s3://no-such-bucket/train/shard-{000000..000004}.tar"), preprocess, tokenizer)
    with pytest.raises(ConfigError, match="matches no shard"):
        source(cfg_for(f"s3://{s3_bucket}/elsewhere/shard-{{000000..000004}}.tar"), preprocess, tokenizer)
    with pytest.raises(ConfigError, match="4 of 9 shards"):
        source(cfg_for(s3_shards.replace("000004", "000008")), preprocess, tokenizer)

    fs = s3mod.s3_filesystem(os.environ["AWS_ENDPOINT_URL"])

    def denied(*a, **k):
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(fs, "ls", denied)
    with pytest.raises(ConfigError, match="access denied.*AWS_PROFILE"):
        source(cfg_for(s3_shards), preprocess, tokenizer)


def test_explicit_endpoint_flag(s3_server, s3_shards, preprocess, tokenizer, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    cfg = cfg_for(s3_shards, s3_endpoint_url=s3_server.endpoint)
    assert source(cfg, preprocess, tokenizer).num_samples == 100
    with pytest.raises(ConfigError, match="cannot list .*AWS_ENDPOINT_URL"):
        source(cfg_for(s3_shards), preprocess, tokenizer)


def _rank_keys(rank: int, world: int, url: str) -> tuple[int, list[str]]:
    import open_clip

    cfg = cfg_for(url, workers=1)
    src = WebDatasetSource(cfg, "train", open_clip.image_transform(32, is_train=True),
                           open_clip.get_tokenizer("ViT-B-32", context_length=16), rank, world, 5)
    return src.num_batches, [k for b in src.batches(0) for k in b["keys"]]


@pytest.mark.dist
def test_two_rank_job_reads_disjoint_halves_from_s3(s3_shards):
    from tests.distributed import run_ranks

    results = run_ranks(_rank_keys, 2, s3_shards, timeout=120)
    (n0, k0), (n1, k1) = results
    assert n0 == n1 == 10
    assert len(k0) == len(k1) == 50
    assert not set(k0) & set(k1)
