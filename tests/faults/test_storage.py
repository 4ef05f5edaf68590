"""Storage faults between dsclip and S3: a fault-injecting proxy (``tests/faults/proxy.py``) sits
in front of moto's S3 server and ``AWS_ENDPOINT_URL`` points at the proxy.

The reader must either ride through (every retry counted, every sample delivered exactly once)
or stop with one clear line; a training run must lose no sample and no checkpoint.  The
outage here lasts 3 s, a stand-in for a server that stops for 30 s: the reader's backoff
(0.25 s doubling, capped at 8 s) waits 7.75 s over the default 5 retries and 31.75 s over 8, so
riding through a 30 s outage needs ``--shard-retries 8``.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from tests.faults.proxy import FaultProxy
from tests.launch import cpu_env, launch_train, tiny_args

pytestmark = [pytest.mark.faults]

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval", "--report-to", ""]


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _upload_shards(s3_server, bucket: str, folder, shards: int, per_shard: int) -> tuple[str, set[str]]:
    """``shards`` tars of ``per_shard`` samples in ``s3://bucket/train/``; (brace URL, sample keys)."""
    from dsclip.data.shards import write_shards

    keys = [f"k{n:04d}" for n in range(shards * per_shard)]
    write_shards(((k, _image(n), f"a photo numbered {n}") for n, k in enumerate(keys)), str(folder), per_shard)
    s3_server.upload_dir(str(folder), bucket, "train")
    return f"s3://{bucket}/train/shard-{{000000..{shards - 1:06d}}}.tar", set(keys)


def _source(url: str, batch_size: int, **data):
    import open_clip

    from dsclip.config import Config
    from dsclip.data.wds import WebDatasetSource

    cfg = Config()
    cfg.data.train_data, cfg.data.workers, cfg.data.shuffle_buffer = url, 0, 8
    for k, v in data.items():
        setattr(cfg.data, k, v)
    # 4 KiB range reads: every shard takes several requests, so faults land mid-shard
    return WebDatasetSource(cfg, "train", open_clip.image_transform(32, is_train=True),
                            open_clip.get_tokenizer("ViT-B-32", context_length=16), 0, 1, batch_size,
                            block_size=4096)


def _read_epoch(src) -> list[str]:
    return [k for b in src.batches(0) for k in b["keys"]]


def _names(keys) -> set[str]:
    return {k.rsplit("/", 1)[-1] for k in keys}


@pytest.fixture
def shards(s3_server, s3_bucket, tmp_path):
    return _upload_shards(s3_server, s3_bucket, tmp_path / "shards", shards=6, per_shard=6)


def test_reader_rides_through_5xx_dropped_connections_and_slow_responses(s3_server, shards, monkeypatch,
                                                                          fault_row):
    url, expected = shards
    with FaultProxy(s3_server.endpoint, error_rate=0.2, drop_rate=0.1, delay=0.02, seed=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        src = _source(url, batch_size=6, shard_retries=8)
        keys = _read_epoch(src)
    injected = proxy.counts["injected_error"] + proxy.counts["injected_drop"]
    stats = src.stats()
    assert proxy.counts["injected_error"] > 0 and proxy.counts["injected_drop"] > 0, proxy.counts
    assert len(keys) == len(expected) and _names(keys) == expected  # each sample once
    # botocore retries a failed request once more by itself (see the module docstring), so the
    # reader sees, and counts, only the faults that hit twice in a row or mid-body
    assert stats["skipped"] == 0 and 0 < stats["retries"] <= injected, (stats, proxy.counts)
    fault_row.update(fault="S3 returns 500/503, drops connections, answers slowly",
                     injected=f"{proxy.counts['injected_error']} errors + {proxy.counts['injected_drop']} drops "
                              f"in {proxy.counts['faultable']} object requests, +20 ms each",
                     outcome=f"reader retried {stats['retries']}x at the byte offset; all {len(keys)} samples once",
                     steps_lost=0, samples_lost=0, checkpoints_lost=0)


def test_reader_rides_through_a_storage_outage(s3_server, shards, monkeypatch, fault_row):
    url, expected = shards
    with FaultProxy(s3_server.endpoint, outage_after=4, outage_seconds=3.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        src = _source(url, batch_size=6)  # the default --shard-retries 5
        t0 = time.monotonic()
        keys = _read_epoch(src)
        elapsed = time.monotonic() - t0
    stats = src.stats()
    assert proxy.counts["outages"] == 1
    assert elapsed >= 3.0
    assert len(keys) == len(expected) and _names(keys) == expected
    assert stats["skipped"] == 0 and stats["retries"] >= 2, stats  # refused until the server came back
    fault_row.update(fault="S3 endpoint down for a while", injected="connections refused for 3 s mid-shard "
                     "(stand-in for 30 s, which needs --shard-retries 8)",
                     outcome=f"{stats['retries']} retries with backoff; all {len(keys)} samples once",
                     steps_lost=0, samples_lost=0, checkpoints_lost=0)


def test_reader_stops_with_one_line_when_credentials_expire(s3_server, shards, monkeypatch, fault_row):
    from dsclip.data.wds import DataError

    url, _ = shards
    with FaultProxy(s3_server.endpoint, expired_after=2) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        src = _source(url, batch_size=6, shard_retries=5)
        t0 = time.monotonic()
        with pytest.raises(DataError) as err:
            _read_epoch(src)
        elapsed = time.monotonic() - t0
    message, stats = str(err.value), src.stats()
    assert proxy.counts["injected_expired"] >= 1, proxy.counts
    assert "\n" not in message
    assert stats["retries"] == 0 and stats["by_kind"] == {}, stats  # refused credentials: no retry, no skip
    assert "credentials" in message and "--resume latest" in message, message
    assert elapsed < 5, elapsed  # no backoff: 5 retries would sleep 7.75 s
    fault_row.update(fault="S3 credentials expire mid-epoch (reader)",
                     injected="400 ExpiredToken from the 3rd object request on",
                     outcome=f"DataError at once, 0 retries, 0 shards skipped: {message[:90]}",
                     steps_lost="-", samples_lost="-", checkpoints_lost=0)


# ---------------------------------------------------------------- a real training run


def _train_args(tmp_path, url: str, *extra: str) -> list[str]:
    return tiny_args(str(tmp_path), "run", "--train-data", url, "--dataset-type", "webdataset",
                     "--train-num-samples", "64", "--save-every-n-steps", "2", "--keep-last-n", "10",
                     "--log-every-n-steps", "1", "--shuffle-buffer", "8", *NO_EVAL, *extra)


def _complete_tags(ckpt_dir) -> list[str]:
    from dsclip.checkpoint import complete_tags

    return complete_tags(str(ckpt_dir))


@pytest.mark.dist
def test_training_from_s3_rides_through_faults_without_losing_samples_or_checkpoints(
        s3_server, s3_bucket, tmp_path, fault_row):
    url, expected = _upload_shards(s3_server, s3_bucket, tmp_path / "shards", shards=8, per_shard=8)
    trace = tmp_path / "trace"
    trace.mkdir()
    with FaultProxy(s3_server.endpoint, error_rate=0.2, drop_rate=0.1, outage_after=10, outage_seconds=2.0,
                    seed=3) as proxy:
        env = cpu_env(AWS_ENDPOINT_URL=proxy.endpoint, DSCLIP_TRACE_KEYS=str(trace))
        proc = launch_train(_train_args(tmp_path, url), nproc=2, launcher="torchrun", env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:]
    injected = proxy.counts["injected_error"] + proxy.counts["injected_drop"] + proxy.counts["injected_outage"]
    assert injected > 0 and proxy.counts["outages"] == 1, proxy.counts
    retries = sum("retrying s3://" in line for line in proc.stdout.splitlines())
    assert retries >= injected, (retries, proxy.counts)
    seen = []
    for rank in (0, 1):
        for line in (trace / f"keys-rank{rank}.txt").read_text().splitlines():
            seen += line.split()[2].split(",")
    assert len(seen) == len(expected) and _names(seen) == expected  # 8 steps x 2 ranks x 4, each sample once
    ckpts = tmp_path / "run" / "checkpoints"
    assert _complete_tags(ckpts) == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    assert (ckpts / "latest").read_text() == "step_00000008"
    fault_row.update(fault="S3 faults during 2-rank training", injected=f"{injected} faults ({proxy.counts['outages']} "
                     f"outage of 2 s) in {proxy.counts['faultable']} object requests",
                     outcome=f"finished; {retries} retries logged; every sample once; checkpoints 2-8 complete",
                     steps_lost=0, samples_lost=0, checkpoints_lost=0)


def test_training_stops_cleanly_when_credentials_expire(s3_server, s3_bucket, tmp_path, fault_row):
    url, _ = _upload_shards(s3_server, s3_bucket, tmp_path / "shards", shards=8, per_shard=8)
    with FaultProxy(s3_server.endpoint, expired_after=9) as proxy:
        env = cpu_env(AWS_ENDPOINT_URL=proxy.endpoint)
        # a DataLoader worker reads the shards: its error reaches the trainer re-wrapped
        proc = launch_train(_train_args(tmp_path, url, "--batch-size", "8", "--workers", "1"), nproc=1,
                            launcher="python", env=env, timeout=300)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("dsclip: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert "storage refused the credentials" in errors[0] and "--resume latest" in errors[0], errors
    assert "retrying s3://" not in proc.stdout
    ckpts = tmp_path / "run" / "checkpoints"
    tags = _complete_tags(ckpts)
    assert tags and (ckpts / "latest").read_text() == tags[-1]  # what was saved stays loadable
    fault_row.update(fault="S3 credentials expire mid-run (training)",
                     injected=f"400 ExpiredToken after {proxy.expired_after} object requests",
                     outcome=f"exit {proc.returncode}, one line: {errors[0][len('dsclip: error: '):][:70]}; "
                             f"latest {tags[-1]} complete", steps_lost=f"after {tags[-1]}", samples_lost=0,
                     checkpoints_lost=0)
