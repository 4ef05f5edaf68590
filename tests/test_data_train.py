"""The trainer on WebDataset shards streamed from a real loopback S3 server (moto), 2 ranks,
ZeRO-2: it trains, a SIGKILL mid-epoch followed by --resume latest reproduces the
uninterrupted run's sample sequence exactly (checked by sample keys), and unusable samples are
counted by kind over both ranks in results.jsonl."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from tests.launch import cpu_env, launch_many, launch_train, tiny_args

pytestmark = pytest.mark.dist

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval"]


def _shards(tmp_path, s3_server, bucket) -> str:
    from dsclip.data.shards import write_shards
    from dsclip.data.synthetic import synthetic_sample

    def samples():
        for i in range(96):
            img, caption = synthetic_sample(3, i, (32, 32))
            arr = ((img.clamp(-1, 1) + 1) * 127.5).byte().permute(1, 2, 0).numpy()
            yield f"{i:06d}", Image.fromarray(arr), caption

    local = tmp_path / "shards"
    write_shards(samples(), str(local), samples_per_shard=16)
    s3_server.upload_dir(str(local), bucket, "train")
    return f"s3://{bucket}/train/shard-{{000000..000005}}.tar"


def _trace(path) -> list[tuple[int, int, str]]:
    rows = []
    for line in path.read_text().splitlines():
        epoch, batch, keys = line.split(" ", 2)
        rows.append((int(epoch), int(batch), keys))
    return rows


def _bad_shards(folder) -> str:
    """4 shards of 8 samples (sizes.json says so), each with one defect of another kind."""
    from tests.test_data_wds import _jpeg, _tar

    folder.mkdir()
    defects = {"a": ("jpg", b"not an image", "txt", b"cap"), "b": ("jpg", _jpeg(50), "txt", b"   "),
               "c": ("jpg", _jpeg(51), "cls", b"3"), "d": None}
    for name, defect in defects.items():
        members = [(f"{name}{i}.{ext}", data) for i in range(7 if defect else 8)
                   for ext, data in (("jpg", _jpeg(i)), ("txt", f"photo {i}".encode()))]
        if defect:
            members += [(f"{name}7.{defect[0]}", defect[1]), (f"{name}7.{defect[2]}", defect[3])]
        _tar(str(folder / f"{name}.tar"), members)
    with open(folder / "d.tar", "r+b") as fh:  # cut mid-member: the rest of d.tar is lost
        fh.truncate(os.path.getsize(folder / "d.tar") // 2 + 100)
    (folder / "sizes.json").write_text(json.dumps({f"{n}.tar": 8 for n in defects}))
    return str(folder / "{a,b,c,d}.tar")


def test_s3_training_and_exact_sample_resume(tmp_path, s3_server, s3_bucket):
    url = _shards(tmp_path, s3_server, s3_bucket)
    # 96 samples, 2 ranks x batch 4: 12 steps/epoch; 2 epochs; checkpoint every 5 steps (mid-epoch)
    common = ["--train-data", url, "--dataset-type", "webdataset", "--train-num-samples", "96", "--epochs", "2",
              "--workers", "1", "--save-every-n-steps", "5", "--shuffle-buffer", "8", *NO_EVAL]
    for name in ("full", "crash", "resumed"):
        (tmp_path / f"keys-{name}").mkdir()
    crashed = tiny_args(str(tmp_path), "crash", *common)
    # 32 samples with 4 defects: each rank reads 2 of the 4 shards, so only both ranks' counts add up
    bad = tiny_args(str(tmp_path), "bad", "--train-data", _bad_shards(tmp_path / "bad-shards"), "--dataset-type",
                    "webdataset", "--train-num-samples", "32", "--max-skip-fraction", "1", *NO_EVAL)
    # one job: the uninterrupted run, the corrupt data, then the first run SIGKILLed after step 8
    # (checkpoint at 5)
    results, job = launch_many({
        "full": (tiny_args(str(tmp_path), "full", *common), {"DSCLIP_TRACE_KEYS": str(tmp_path / "keys-full")}),
        "bad": bad,
        "crash": (crashed, {"DSCLIP_TRACE_KEYS": str(tmp_path / "keys-crash"), "DSCLIP_FAULT": "kill_at_step:8"}),
    })
    assert results["full"].returncode == 0, results["full"].stdout[-3000:]
    assert "2 rank(s)" in results["full"].stdout and "ZeRO-2" in results["full"].stdout
    assert results["bad"].returncode == 0, results["bad"].stdout[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "bad" / "results.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "train"][-1]
    kinds = {k.rsplit("/", 1)[1]: v for k, v in last.items() if k.startswith("data/skipped/")}
    assert kinds == {"bad_image": 1, "empty_caption": 1, "missing_caption": 1, "corrupt_tar": 1}, last
    assert last["data/skipped"] == 4 and set(last["data/worst_shards"]) == {"a.tar", "b.tar", "c.tar", "d.tar"}
    usable = last["data/samples"] - 3  # every raw sample read once; corrupt_tar is not a sample
    assert 24 < last["data/samples"] < 32 and last["data/repeated"] == 32 - usable  # the short streams wrapped
    assert "skipped 4 (bad_image 1, corrupt_tar 1, empty_caption 1, missing_caption 1; worst" in results["bad"].stdout
    assert job.returncode != 0 and results["crash"].returncode != 0
    proc = launch_train(crashed + ["--resume", "latest"],
                        env=cpu_env(DSCLIP_TRACE_KEYS=str(tmp_path / "keys-resumed")))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed step_00000005" in proc.stdout and "batch 5 from the saved reader positions" in proc.stdout

    for rank in (0, 1):
        full = _trace(tmp_path / "keys-full" / f"keys-rank{rank}.txt")
        before = [r for r in _trace(tmp_path / "keys-crash" / f"keys-rank{rank}.txt") if (r[0], r[1]) < (0, 5)]
        after = _trace(tmp_path / "keys-resumed" / f"keys-rank{rank}.txt")
        assert len(full) == 24 and before + after == full  # none twice, none skipped, same order
    a = (tmp_path / "full" / "final.safetensors").read_bytes()
    b = (tmp_path / "crash" / "final.safetensors").read_bytes()
    assert a == b
