"""--remote-sync: completed checkpoints go to S3 (the loopback moto server), `latest` last, and
a fresh machine with an empty run dir resumes from there with --resume latest."""

from __future__ import annotations

import pytest

from tests.launch import launch_train, tiny_args

pytestmark = pytest.mark.dist

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval"]


def test_checkpoints_sync_to_s3_and_a_fresh_pod_resumes(tmp_path, s3_server, s3_bucket):
    remote = f"s3://{s3_bucket}/runs/r1"
    args = ["--save-every-n-steps", "4", "--max-steps", "4", "--remote-sync", remote, *NO_EVAL]
    proc = launch_train(tiny_args(str(tmp_path / "pod1"), "r1", *args))
    assert proc.returncode == 0, proc.stdout[-3000:]
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "runs/r1/checkpoints/latest" in keys
    assert "runs/r1/checkpoints/step_00000004/dsclip_manifest.json" in keys
    body = client.get_object(Bucket=s3_bucket, Key="runs/r1/checkpoints/latest")["Body"].read()
    assert body == b"step_00000004"

    # a new pod: empty local disk, same run name, longer schedule
    args2 = ["--save-every-n-steps", "4", "--max-steps", "6", "--remote-sync", remote, "--resume", "latest", *NO_EVAL]
    proc = launch_train(tiny_args(str(tmp_path / "pod2"), "r1", *args2))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "downloaded step_00000004" in proc.stdout and "resumed step_00000004" in proc.stdout
    assert (tmp_path / "pod2" / "r1" / "final.safetensors").exists()
