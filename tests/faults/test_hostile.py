"""Hostile input, end to end: each check goes through ``dsclip.train.main`` (in this process, for
input refused before the DeepSpeed engine exists) or a real launch.

- a checkpoint pickle that runs code on load, given to ``--pretrained`` or to ``--resume``;
- a ``pipe:`` URL without ``--allow-pipe-urls``;
- a YAML config with an unknown key or a wrongly typed value;
- credentials in a URL on the command line, which launchers log, refused with one line;
- one real training run from S3 whose shards hold tar members named ``../..`` or ``/abs`` and a
  decompression bomb, run with secrets in the environment and credentials in a URL of the YAML
  config: nothing may be written outside the run, the bomb must be skipped by
  ``--max-image-pixels``, and no secret may reach ``params.yaml``, the logs (the deepspeed
  launcher's included), TensorBoard, the checkpoints or the export.
"""

from __future__ import annotations

import io
import os
import secrets
import string
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.launch import ROOT, TINY, cpu_env, launch_train, tiny_args

pytestmark = [pytest.mark.faults]

NO_EVAL = ["--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval", "--report-to", ""]


class _Payload:
    """Unpickling this creates ``path``: a stand-in for any code an attacker would run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def run_main(capsys):
    """``dsclip.train.main(argv)`` in this process -> (exit code, stderr lines).  A single-process
    run sets RANK/WORLD_SIZE/MASTER_* and starts a process group; both are undone afterwards."""
    saved = dict(os.environ)

    def run(argv: list[str]) -> tuple[int, list[str]]:
        from dsclip.train import main

        capsys.readouterr()
        code = main(argv)
        return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]

    yield run
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    ds_comm.cdb = None
    os.environ.clear()
    os.environ.update(saved)


def _tiny(tmp_path, *extra: str) -> list[str]:
    return tiny_args(str(tmp_path), "run", "--train-num-samples", "16", *NO_EVAL, *extra)


def _one_error(lines: list[str]) -> str:
    errors = [ln for ln in lines if ln.startswith("dsclip: error:")]
    assert len(errors) == 1, lines
    return errors[0]


# ---------------------------------------------------------------- pickles that run code


def _tiny_state_dict() -> dict[str, torch.Tensor]:
    import open_clip

    open_clip.add_model_config(TINY)
    return open_clip.create_model("tiny-clip").state_dict()


@pytest.mark.parametrize("where", ["file", "deepspeed-dir"])
def test_pretrained_pickle_that_runs_code_is_refused(tmp_path, run_main, where, fault_row):
    sentinel = tmp_path / "payload-ran"
    poisoned = {"state_dict": _tiny_state_dict(), "extra": _Payload(str(sentinel))}
    if where == "file":
        target = tmp_path / "weights.pt"
        torch.save(poisoned, target)
    else:  # a DeepSpeed checkpoint dir, as a dsclip run leaves it
        target = tmp_path / "ckpt" / "step_00000004"
        target.mkdir(parents=True)
        torch.save({"module": poisoned["state_dict"], "extra": poisoned["extra"]},
                   target / "mp_rank_00_model_states.pt")
        (tmp_path / "ckpt" / "latest").write_text("step_00000004")
    probe = target if where == "file" else target / "mp_rank_00_model_states.pt"
    torch.load(probe, weights_only=False)  # the payload is live: a plain load runs it
    assert sentinel.exists()
    sentinel.unlink()

    code, err = run_main(_tiny(tmp_path, "--pretrained", str(target)))
    line = _one_error(err)
    assert code == 2 and "refusing to unpickle" in line and "io.open" in line, err
    assert not sentinel.exists()
    fault_row.update(fault=f"--pretrained pickle runs code on load ({where})",
                     injected="__reduce__ -> open(sentinel, 'w') inside the checkpoint",
                     outcome="exit 2, one line naming io.open; payload never ran", steps_lost="-",
                     samples_lost="-", checkpoints_lost=0)


def _poisoned_tag(tmp_path, sentinel) -> str:
    """A complete-looking dsclip checkpoint whose model-states pickle carries a payload."""
    from dsclip.checkpoint import atomic_write_text, write_manifest

    ckpt_dir = tmp_path / "evil" / "checkpoints"
    tag_dir = ckpt_dir / "step_00000002"
    tag_dir.mkdir(parents=True)
    torch.save({"module": _tiny_state_dict(), "dp_world_size": 1, "payload": _Payload(str(sentinel))},
               tag_dir / "mp_rank_00_model_states.pt")
    write_manifest(str(tag_dir), {"step": 2, "zero_stage": 2, "world_size": 1})
    atomic_write_text(str(ckpt_dir / "latest"), "step_00000002")
    return str(tag_dir)


def test_prepare_resume_refuses_a_checkpoint_pickle_that_runs_code(tmp_path):
    from dsclip.config import ConfigError
    from dsclip.reshard import prepare_resume

    sentinel = tmp_path / "payload-ran"
    tag_dir = _poisoned_tag(tmp_path, sentinel)
    with pytest.raises(ConfigError, match=r"cannot resume from .*io\.open"):
        prepare_resume(os.path.dirname(tag_dir), "step_00000002", 1, 0)
    assert not sentinel.exists()



def test_resume_pickle_that_runs_code_is_refused(tmp_path, run_main, fault_row):
    sentinel = tmp_path / "payload-ran"
    tag_dir = _poisoned_tag(tmp_path, sentinel)
    try:
        code, err = run_main(_tiny(tmp_path, "--resume", tag_dir))
    except Exception as e:  # noqa: BLE001 - unguarded, DeepSpeed unpickles it and then chokes on it
        code, err = None, [f"{type(e).__name__}: {e}"]
    fault_row.update(fault="--resume a checkpoint whose pickle runs code",
                     injected="__reduce__ payload in mp_rank_00_model_states.pt",
                     outcome="PAYLOAD RAN (DeepSpeed unpickled it)" if sentinel.exists()
                     else f"exit {code}, refused before DeepSpeed read it", steps_lost="-", samples_lost="-",
                     checkpoints_lost=0)
    assert not sentinel.exists()
    line = _one_error(err)
    assert code == 2 and "cannot resume" in line and "io.open" in line, err


# ---------------------------------------------------------------- pipe: URLs and YAML configs


def test_pipe_url_is_refused_without_allow_flag(tmp_path, fault_row):
    # a process of its own: the check runs after the DeepSpeed engine exists, and DeepSpeed keeps
    # process-group state that one test process cannot reset cleanly
    sentinel = tmp_path / "pipe-ran"
    url = f"pipe:touch {sentinel} && cat /dev/null"
    proc = launch_train(_tiny(tmp_path, "--train-data", url, "--dataset-type", "webdataset"), nproc=1,
                        timeout=300)
    line = _one_error(proc.stdout.splitlines())
    assert proc.returncode == 2 and "--allow-pipe-urls" in line, proc.stdout[-2000:]
    assert not sentinel.exists()
    fault_row.update(fault="pipe: URL as --train-data", injected="pipe:touch SENTINEL && ...",
                     outcome="exit 2, one line naming --allow-pipe-urls; command never ran", steps_lost="-",
                     samples_lost="-", checkpoints_lost=0)


@pytest.mark.parametrize("yaml_text,needle", [
    ("optim:\n  lr: 1.0e-4\n  lr_warmpu: 10\n", "optim.lr_warmpu"),
    ("optim:\n  batch_size: lots\n", "batch_size"),
    ("data:\n  max_image_pixels: [1, 2]\n", "max_image_pixels"),
    ("trainer:\n  epochs: 3\n", "trainer"),
], ids=["unknown-key", "wrong-type", "list-for-int", "unknown-section"])
def test_yaml_config_with_unknown_key_or_wrong_type_is_refused(tmp_path, run_main, yaml_text, needle, fault_row):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    code, err = run_main(["--config", str(path), "--logs-dir", str(tmp_path)])
    line = _one_error(err)
    assert code == 2 and needle in line and str(path) in line, err
    assert not (tmp_path / "run").exists()  # refused before any run dir was made
    fault_row.update(fault=f"YAML config: {yaml_text.splitlines()[-1].strip()}", injected=f"--config {path.name}",
                     outcome=f"exit 2: {line.replace(str(path), path.name)[len('dsclip: error: '):][:80]}",
                     steps_lost="-", samples_lost="-",
                     checkpoints_lost=0)


# ---------------------------------------------------------------- credentials in command-line URLs


@pytest.mark.parametrize("flag,url", [
    ("--remote-sync", "https://svc:{secret}@store.example.com/runs/r1"),
    ("--train-data", "s3://AKIAEXAMPLE:{secret}@bucket/train/shard-{{000000..000003}}.tar"),
    ("--val-data", "https://reader:{secret}@data.example.com/val/shard-000000.tar"),
    ("--s3-endpoint-url", "https://key:{secret}@minio.example.com"),
])
def test_credentials_in_a_command_line_url_are_refused(tmp_path, run_main, flag, url, fault_row):
    secret = _random(20)
    code, err = run_main(_tiny(tmp_path, flag, url.format(secret=secret)))
    line = _one_error(err)
    assert code == 2 and flag in line and "--config" in line and "***@" in line, err
    assert secret not in "\n".join(err)
    assert not (tmp_path / "run").exists()
    fault_row.update(fault=f"credentials in a {flag} URL on the command line", injected=f"{flag} scheme://user:SECRET@...",
                     outcome="exit 2, one line pointing to the --config YAML or the environment; secret not echoed",
                     steps_lost="-", samples_lost="-", checkpoints_lost=0)


def test_credentials_in_a_yaml_url_are_accepted_and_masked(tmp_path):
    from dsclip.config import parse_args

    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train_data: s3://AKIAEXAMPLE:hunter2pass@bucket/x-{0..3}.tar\n")
    cfg = parse_args(["--config", str(path)])
    assert cfg.data.train_data == "s3://AKIAEXAMPLE:hunter2pass@bucket/x-{0..3}.tar"
    assert cfg.to_dict()["data"]["train_data"] == "s3://***@bucket/x-{0..3}.tar"


# ---------------------------------------------------------------- one real run with hostile data and secrets


def _jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _bomb_png(side: int = 8000) -> bytes:
    """A 64-megapixel PNG of a few kilobytes: decoded to RGB it takes ~190 MB."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _random(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


@pytest.fixture(scope="module")
def hostile_run(s3_server, tmp_path_factory):
    """2 ranks x 4 samples x 2 steps from S3; shard 0 also holds path-escaping members and a bomb."""
    root = tmp_path_factory.mktemp("hostile")
    token = _random(12, string.ascii_lowercase + string.digits)
    escapes = [f"../../escape-{token}.txt", f"../escape-{token}.jpg", f"/tmp/dsclip-abs-{token}/owned.jpg",
               f"/tmp/dsclip-abs-{token}/owned.txt"]
    shards = root / "shards"
    shards.mkdir()
    normal = [[(f"s{s}n{i}.{ext}", data) for i in range(8)
               for ext, data in (("jpg", _jpeg(10 * s + i)), ("txt", f"a photo {s} {i}".encode()))] for s in (0, 1)]
    hostile = [("bomb.png", _bomb_png()), ("bomb.txt", b"a harmless caption"),
               *((name, _jpeg(99) if name.endswith(".jpg") else b"escaped") for name in escapes)]
    _write_tar(shards / "shard-000000.tar", normal[0][:8] + hostile + normal[0][8:])
    _write_tar(shards / "shard-000001.tar", normal[1])
    bucket = s3_server.new_bucket("hostile")
    s3_server.upload_dir(str(shards), bucket, "train")
    env_secrets = {"AWS_ACCESS_KEY_ID": "AKIA" + _random(16, string.ascii_uppercase + string.digits),
                   "AWS_SECRET_ACCESS_KEY": _random(40), "AWS_SESSION_TOKEN": _random(64),
                   "HF_TOKEN": "hf_" + _random(34), "WANDB_API_KEY": _random(40, "0123456789abcdef")}
    url_secret = _random(24)
    # credentials in a URL dsclip really uses, given the one safe way: in the YAML config, which
    # no launcher echoes
    config = root / "secret.yaml"
    config.write_text(f"run:\n  remote_sync: memory://svc-{token}:{url_secret}@sync/dsclip\n")
    trace = root / "trace"
    trace.mkdir()
    args = tiny_args(str(root), "run", "--train-data", f"s3://{bucket}/train/shard-{{000000..000001}}.tar",
                     "--dataset-type", "webdataset", "--train-num-samples", "16", "--shuffle-buffer", "4",
                     "--max-image-pixels", "1000000", "--max-skip-fraction", "1.0", "--config", str(config),
                     "--log-every-n-steps", "1", "--val-frequency", "0", "--zeroshot-frequency", "0",
                     "--no-baseline-eval", "--report-to", "tensorboard")
    proc = launch_train(args, nproc=2, launcher="deepspeed", timeout=400,
                        env=cpu_env(DSCLIP_TRACE_KEYS=str(trace), **env_secrets))
    return {"proc": proc, "root": root, "run_dir": root / "run", "trace": trace, "escapes": escapes,
            "token": token, "secrets": {**env_secrets, "url credential": url_secret}}


def _trained_keys(trace) -> list[str]:
    keys = []
    for f in sorted(trace.iterdir()):
        for line in f.read_text().splitlines():
            keys += line.split()[2].split(",")
    return keys


def test_tar_members_escaping_the_shard_are_never_written(hostile_run, fault_row):
    proc, root, token = hostile_run["proc"], hostile_run["root"], hostile_run["token"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    keys = _trained_keys(hostile_run["trace"])
    assert len(keys) == 16 and not any("escape" in k or "owned" in k for k in keys), keys
    # wherever an extracting reader would have put them: relative to the job's cwd, the run, the
    # shard folder, or the absolute path itself
    bases = [ROOT, str(root), str(hostile_run["run_dir"]), str(root / "shards"), "/"]
    for name in hostile_run["escapes"]:
        for base in bases:
            assert not os.path.exists(os.path.normpath(os.path.join(base, name.lstrip("/")))), (base, name)
    assert not os.path.exists(f"/tmp/dsclip-abs-{token}")
    fault_row.update(fault="tar members named ../ and /abs", injected="4 such members in an S3 shard",
                     outcome="skipped in memory (unsafe_member); nothing written outside the run", steps_lost=0,
                     samples_lost=0, checkpoints_lost=0)


def test_decompression_bomb_is_skipped_by_max_image_pixels(hostile_run, fault_row):
    proc = hostile_run["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    keys = _trained_keys(hostile_run["trace"])
    assert not any(k.endswith("/bomb") for k in keys) and len(keys) == 16
    fault_row.update(fault="decompression bomb (8000x8000 PNG, 3 KB)", injected="one sample in an S3 shard",
                     outcome="skipped from its header by --max-image-pixels 1e6; never decoded", steps_lost=0,
                     samples_lost=0, checkpoints_lost=0)


def test_secrets_stay_out_of_params_logs_tensorboard_and_checkpoints(hostile_run, fault_row):
    proc, run_dir = hostile_run["proc"], hostile_run["run_dir"]
    assert proc.returncode == 0, proc.stdout[-3000:]
    params = (run_dir / "params.yaml").read_text()
    assert "memory://***@sync/dsclip" in params
    assert any((run_dir / "tensorboard").iterdir())
    files = [os.path.join(d, f) for d, _, names in os.walk(run_dir) for f in names]
    # the deepspeed launcher logs every rank's full command line: its lines are searched too
    assert any(_launcher_echo(line) for line in proc.stdout.splitlines()), proc.stdout[-2000:]
    assert "uploaded step_00000002 to memory://***@sync/dsclip" in proc.stdout, proc.stdout[-2000:]
    leaks = []
    for what, value in hostile_run["secrets"].items():
        leaks += [f"{what} in the output: {line.replace(value, '<SECRET>')[:200]}"
                  for line in proc.stdout.splitlines() if value in line]
        for path in files:
            with open(path, "rb") as fh:
                if value.encode() in fh.read():
                    leaks.append(f"{what} in {os.path.relpath(path, run_dir)}")
    assert not leaks, leaks
    fault_row.update(fault="secrets in env and in a URL (YAML config)", injected="AWS keys + session token, HF/W&B tokens "
                     "in env; user:password in the --remote-sync URL (YAML config)",
                     outcome=f"none in the job's output (launcher included) or {len(files)} run files "
                     "(params.yaml, TensorBoard, checkpoints, export)", steps_lost=0, samples_lost=0,
                     checkpoints_lost=0)


def _launcher_echo(line: str) -> bool:
    """A line where DeepSpeed's launcher prints the command it runs (runner.py, launch.py)."""
    return ("runner.py" in line and "cmd = " in line) or ("launch.py" in line and "spawned with command" in line)


def test_remote_sync_url_credentials_stay_out_of_the_download_message(tmp_path, monkeypatch, capsys):
    """``--resume latest --remote-sync URL`` on a fresh machine says where it fetched from."""
    import torch.distributed as dist

    from dsclip import checkpoint as ckpt
    from dsclip import train
    from dsclip.config import parse_args

    monkeypatch.setattr(ckpt, "download_latest", lambda remote, local: "step_00000002")
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    config = tmp_path / "run.yaml"
    config.write_text("run:\n  remote_sync: sftp://svc:hunter2pass@host/dsclip\n")
    cfg = parse_args(["--config", str(config), "--resume", "latest", "--name", "run"])

    class Ctx:
        is_main, rank, world = True, 0, 1

    train._find_resume(cfg, str(tmp_path), Ctx())
    out = capsys.readouterr().out
    assert "downloaded step_00000002" in out
    assert "hunter2pass" not in out, out
