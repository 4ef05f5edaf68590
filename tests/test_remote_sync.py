"""--remote-sync: completed checkpoints go to S3 (the loopback moto server), `latest` last, and
a fresh machine with an empty run dir resumes from there with --resume latest.  The uploader's
own rules (pruning waits for it, retries, one-line failures) are checked directly against an
in-memory filesystem.  (Uploads under storage faults: tests/faults/test_storage.py.)"""

from __future__ import annotations

import threading

import pytest

from tests.launch import launch_many, tiny_args

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval"]


@pytest.mark.dist
def test_checkpoints_sync_to_s3_and_a_fresh_pod_resumes(tmp_path, s3_server, s3_bucket):
    remote = f"s3://{s3_bucket}/runs/r1"
    # the first pod; then a new pod: empty local disk, same run name, longer schedule (one job, in order)
    args1 = ["--save-every-n-steps", "4", "--max-steps", "4", "--remote-sync", remote, *NO_EVAL]
    args2 = ["--save-every-n-steps", "4", "--max-steps", "6", "--remote-sync", remote, "--resume", "latest", *NO_EVAL]
    results, _ = launch_many({"pod1": tiny_args(str(tmp_path / "pod1"), "r1", *args1),
                              "pod2": tiny_args(str(tmp_path / "pod2"), "r1", *args2)})
    pod1, pod2 = results["pod1"], results["pod2"]
    assert pod1.returncode == 0, pod1.stdout[-3000:]
    assert "uploaded step_00000004" in pod1.stdout
    assert pod2.returncode == 0, pod2.stdout[-3000:]
    assert "downloaded step_00000004" in pod2.stdout and "resumed step_00000004" in pod2.stdout
    assert (tmp_path / "pod2" / "r1" / "final.safetensors").exists()
    client = s3_server.client()
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert "runs/r1/checkpoints/step_00000004/dsclip_manifest.json" in keys
    assert "runs/r1/checkpoints/step_00000006/dsclip_manifest.json" in keys  # pod2's own checkpoint went up
    body = client.get_object(Bucket=s3_bucket, Key="runs/r1/checkpoints/latest")["Body"].read()
    assert body == b"step_00000006"


# ---------------------------------------------------------------- the uploader itself


def _tag(ckpt_dir, step: int) -> str:
    from dsclip.checkpoint import tag_for, write_manifest

    tag = tag_for(step)
    (ckpt_dir / tag).mkdir(parents=True)
    (ckpt_dir / tag / "model.pt").write_bytes(b"x" * 100)
    write_manifest(str(ckpt_dir / tag), {"step": step})
    return tag


class _Remote:
    """An fsspec memory filesystem whose writes can be held back or made to fail."""

    def __init__(self, failures: list[BaseException] | None = None):
        import fsspec

        self.fs = fsspec.filesystem("memory")
        self.gate, self.failures, self.writes = threading.Event(), list(failures or []), []
        self.gate.set()

    def _write(self, what: str) -> None:
        self.gate.wait(10)
        if self.failures:
            raise self.failures.pop(0)
        self.writes.append(what)

    def put_file(self, local, remote):
        self._write(remote.split("/")[-1])
        self.fs.put_file(local, remote)

    def pipe_file(self, remote, data):
        self._write("latest=" + data.decode())
        self.fs.pipe_file(remote, data)


@pytest.fixture
def remote(monkeypatch):
    from dsclip import checkpoint as ckpt

    box = _Remote()
    monkeypatch.setattr(ckpt, "_remote_fs", lambda url: (box, f"/sync-{id(box)}"))
    yield box
    ckpt.cancel_uploads()


def test_pruning_keeps_a_tag_until_its_upload_is_done(tmp_path, remote):
    from dsclip import checkpoint as ckpt

    ckpt_dir = tmp_path / "checkpoints"
    first = _tag(ckpt_dir, 2)
    remote.gate.clear()  # the upload of the first tag stalls
    ckpt.sync_checkpoint(str(ckpt_dir), first, "memory://bucket/run", rank=0)
    second = _tag(ckpt_dir, 4)
    ckpt.prune(str(ckpt_dir), keep_last_n=1)
    assert ckpt.complete_tags(str(ckpt_dir)) == [first, second]  # still going up: kept
    assert ckpt.uploading(str(ckpt_dir)) == (first,)
    remote.gate.set()
    ckpt.finish_uploads()
    assert remote.writes == ["model.pt", "dsclip_manifest.json", f"latest={first}"]  # manifest, then latest
    ckpt.prune(str(ckpt_dir), keep_last_n=1)
    assert ckpt.complete_tags(str(ckpt_dir)) == [second] and ckpt.uploading(str(ckpt_dir)) == ()


def test_transient_errors_are_retried_and_refused_credentials_are_one_line(tmp_path, remote, capsys):
    from dsclip import checkpoint as ckpt

    ckpt_dir = tmp_path / "checkpoints"
    tag = _tag(ckpt_dir, 2)
    remote.failures = [ConnectionResetError("reset by peer"), OSError(5, "InternalError")]
    ckpt.upload_checkpoint(str(ckpt_dir), tag, "memory://bucket/run", backoff=0.01)
    assert remote.writes[-1] == f"latest={tag}"
    assert capsys.readouterr().out.count("remote sync: retrying") == 2

    remote.failures = [PermissionError("The provided token has expired.")]
    with pytest.raises(ckpt.RemoteSyncError) as err:
        ckpt.upload_checkpoint(str(ckpt_dir), tag, "memory://key:hunter2@bucket/run", backoff=0.01)
    message = str(err.value)
    assert "\n" not in message and "refused the credentials" in message and "--resume latest" in message
    assert "hunter2" not in message and "memory://***@bucket/run" in message
    assert "retrying" not in capsys.readouterr().out  # not retried

    remote.failures = [ConnectionRefusedError("refused")] * 3
    with pytest.raises(ckpt.RemoteSyncError, match="still failing after 2 retries"):
        ckpt.upload_checkpoint(str(ckpt_dir), tag, "memory://bucket/run", retries=2, backoff=0.01)
