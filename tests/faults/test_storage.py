"""Storage faults between dsclip and S3: a fault-injecting proxy (``tests/faults/proxy.py``) sits
in front of moto's S3 server and ``AWS_ENDPOINT_URL`` points at the proxy.

The reader must either ride through (every retry counted, every sample delivered exactly once)
or stop with one clear line; a training run must lose no sample and no checkpoint.  The
outage here lasts 3 s, a stand-in for a server that stops for 30 s: the reader's default
backoff (0.25 s doubling, capped at 8 s, 10 retries) waits 47.75 s in all, so a 30 s outage is
ridden out at default settings (``test_default_backoff_outlasts_a_30s_outage`` checks the sum).

Checkpoint uploads (``--remote-sync``) meet the same faults: they must ride through 5xx answers
and an outage on rank 0's background thread while training goes on, reach S3 complete for every
saved checkpoint with ``latest`` after its tag, and stop with one line, every checkpoint kept
locally, when the credentials are refused.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from tests.faults.proxy import FaultProxy, uploads
from tests.launch import cpu_env, launch_many, launch_train, tiny_args

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
        src = _source(url, batch_size=6)  # the default --shard-retries
        t0 = time.monotonic()
        keys = _read_epoch(src)
        elapsed = time.monotonic() - t0
    stats = src.stats()
    assert proxy.counts["outages"] == 1
    assert elapsed >= 3.0
    assert len(keys) == len(expected) and _names(keys) == expected
    assert stats["skipped"] == 0 and stats["retries"] >= 2, stats  # refused until the server came back
    fault_row.update(fault="S3 endpoint down for a while", injected="connections refused for 3 s mid-shard "
                     "(stand-in for 30 s: the default backoff waits 47.75 s)",
                     outcome=f"{stats['retries']} retries with backoff; all {len(keys)} samples once",
                     steps_lost=0, samples_lost=0, checkpoints_lost=0)


def test_default_backoff_outlasts_a_30s_outage():
    from dsclip.config import DataConfig
    from dsclip.data.s3 import DEFAULT_RETRIES, RetryingReader, backoff_delays

    retries = DataConfig().shard_retries
    assert retries == DEFAULT_RETRIES
    assert RetryingReader(lambda offset: None, "x").retries == retries
    total = sum(backoff_delays(retries))
    assert total == 47.75 and total > 30  # 0.25 + 0.5 + 1 + 2 + 4 + 5 x 8
    assert sum(backoff_delays(5)) == 7.75  # the old default gave up before a 30 s outage ended


def test_reader_stops_with_one_line_when_credentials_expire(s3_server, shards, monkeypatch, fault_row):
    from dsclip.data.skips import DataError

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
    assert elapsed < 5, elapsed  # no backoff: 5 retries would sleep 7.75 s, the default 10 47.75 s
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
        proc = launch_train(_train_args(tmp_path, url), nproc=2, env=env, timeout=400)
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
                            env=env, timeout=300)
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


# ---------------------------------------------------------------- checkpoint uploads (--remote-sync)

UPLOAD_STEPS = (2, 4, 6, 8)  # 64 samples / (2 ranks x 4) = 8 steps, a checkpoint every 2


@pytest.fixture(scope="module")
def remote_sync_runs(s3_server, tmp_path_factory):
    """Two 2-rank runs in one job, each uploading through its own proxy: one meets 5xx answers, an
    outage and slow writes, the other refused credentials from the 10th write on."""
    root = tmp_path_factory.mktemp("sync")
    bucket = s3_server.new_bucket("sync")

    def args(name):  # keep one checkpoint: pruning would delete a tag still uploading
        return tiny_args(str(root), name, "--save-every-n-steps", "2", "--keep-last-n", "1", "--log-every-n-steps",
                         "1", "--remote-sync", f"s3://{bucket}/{name}", *NO_EVAL)

    flaky = FaultProxy(s3_server.endpoint, faultable=uploads, error_rate=0.15, delay=0.1, outage_after=12,
                       outage_seconds=2.0, seed=7)
    expired = FaultProxy(s3_server.endpoint, faultable=uploads, expired_after=9)
    with flaky, expired:
        results, _ = launch_many({"flaky": (args("flaky"), {"AWS_ENDPOINT_URL": flaky.endpoint}),
                                  "expired": (args("expired"), {"AWS_ENDPOINT_URL": expired.endpoint})}, timeout=400)
    return {"root": root, "bucket": bucket, "results": results, "proxies": {"flaky": flaky, "expired": expired},
            "client": s3_server.client()}


def _remote_tags(client, bucket: str, prefix: str) -> dict[str, bool]:
    """Every tag under ``prefix/checkpoints/`` in S3 -> whether it holds every file its manifest lists,
    at the listed size."""
    import json

    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/checkpoints/"):
        objects.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    tags = {}
    for key in objects:
        parts = key.split("/")
        if len(parts) == 4 and parts[3] == "dsclip_manifest.json":
            files = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())["files"]
            tags[parts[2]] = all(objects.get(f"{prefix}/checkpoints/{parts[2]}/{rel}") == size
                                 for rel, size in files.items())
    return tags


def _latest_after_its_tag(proxy: FaultProxy, client, bucket: str, prefix: str) -> list[str]:
    """The tags ``latest`` named, in upload order; asserts each went up after all of its tag's files."""
    import json

    done: dict[str, float] = {}
    named = []
    for t, method, path, status, body in proxy.forwarded:
        if method != "PUT" or status != 200:
            continue
        key = path.lstrip("/").split("/", 1)[1]
        done[key] = t
        if key == f"{prefix}/checkpoints/latest":
            tag = body.decode()
            files = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/checkpoints/{tag}/"
                                                 "dsclip_manifest.json")["Body"].read())["files"]
            for rel in [*files, "dsclip_manifest.json"]:
                assert done.get(f"{prefix}/checkpoints/{tag}/{rel}", t + 1) < t, (tag, rel)
            named.append(tag)
    return named


@pytest.mark.dist
def test_checkpoint_uploads_ride_through_5xx_and_an_outage(remote_sync_runs, fault_row):
    run, proxy = remote_sync_runs["results"]["flaky"], remote_sync_runs["proxies"]["flaky"]
    client, bucket = remote_sync_runs["client"], remote_sync_runs["bucket"]
    assert run.returncode == 0, run.stdout[-3000:]
    injected = proxy.counts["injected_error"] + proxy.counts["injected_outage"]
    assert proxy.counts["injected_error"] > 0 and proxy.counts["outages"] == 1, proxy.counts
    # botocore repeats a failed request once by itself; dsclip retries, and logs, the rest
    retries = run.stdout.count("[dsclip] remote sync: retrying")
    assert 0 < retries <= injected, (retries, proxy.counts)
    saved = [f"step_{s:08d}" for s in UPLOAD_STEPS]
    assert _remote_tags(client, bucket, "flaky") == {t: True for t in saved}  # every checkpoint, complete
    assert _latest_after_its_tag(proxy, client, bucket, "flaky") == saved
    assert client.get_object(Bucket=bucket, Key="flaky/checkpoints/latest")["Body"].read() == b"step_00000008"
    # uploads ran behind training: a later save found an earlier tag still going up, and pruning
    # (--keep-last-n 1) kept it until it was there
    assert "step_00000004 waits for step_00000002" in run.stdout, run.stdout[-3000:]
    fault_row.update(fault="S3 faults during checkpoint uploads (--remote-sync)",
                     injected=f"{proxy.counts['injected_error']} 500/503 + 1 outage of 2 s in "
                              f"{proxy.counts['faultable']} uploads, +100 ms each",
                     outcome=f"{retries} retries in the background; all {len(saved)} checkpoints complete in S3, "
                             f"latest after its tag", steps_lost=0, samples_lost=0, checkpoints_lost=0)


@pytest.mark.dist
def test_refused_credentials_stop_uploads_with_one_line_and_keep_local_checkpoints(remote_sync_runs, fault_row):
    from dsclip.checkpoint import complete_tags, step_of

    run, proxy = remote_sync_runs["results"]["expired"], remote_sync_runs["proxies"]["expired"]
    client, bucket = remote_sync_runs["client"], remote_sync_runs["bucket"]
    assert run.returncode == 1 and proxy.counts["injected_expired"] >= 1, (proxy.counts, run.stdout[-3000:])
    errors = [ln for ln in run.stdout.splitlines() if ln.startswith("dsclip: error:")]
    assert len(errors) == 1 and "Traceback" not in run.stdout, run.stdout[-3000:]
    assert "storage refused the credentials" in errors[0] and "--resume latest" in errors[0], errors
    assert "remote sync: retrying" not in run.stdout  # refused credentials are not retried
    ckpts = remote_sync_runs["root"] / "expired" / "checkpoints"
    local = complete_tags(str(ckpts))
    latest = (ckpts / "latest").read_text()
    assert latest in local
    saved = [f"step_{s:08d}" for s in UPLOAD_STEPS if s <= step_of(latest)]
    remote = _remote_tags(client, bucket, "expired")
    lost = [t for t in saved if not remote.get(t) and t not in local]
    assert not lost, (saved, remote, local)  # each checkpoint is complete in S3 or still on the local disk
    remote_latest = client.get_object(Bucket=bucket, Key="expired/checkpoints/latest")["Body"].read().decode()
    assert remote[remote_latest] and remote_latest == "step_00000002", remote  # 7 writes a tag: the 1st went up
    fault_row.update(fault="S3 credentials expire during checkpoint uploads",
                     injected=f"400 ExpiredToken from upload {proxy.expired_after + 1} on",
                     outcome=f"exit 1, one line: {errors[0][len('dsclip: error: '):][:60]}...; remote latest "
                             f"{remote_latest} complete, {len(saved) - 1} newer kept locally",
                     steps_lost=f"after {latest}", samples_lost=0, checkpoints_lost=len(lost))
