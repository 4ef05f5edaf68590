"""Launch real multi-rank dsclip training jobs from tests.

``launch_train(args, nproc=2, launcher="deepspeed")`` runs ``dsclip/train.py`` through the real
``deepspeed`` launcher or ``torchrun`` on CPU ranks (gloo), on a free loopback port, with a hang
timeout, and returns the completed process (stdout+stderr in ``.stdout``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "dsclip", "train.py")
TINY = os.path.join(ROOT, "tests", "assets", "tiny-clip.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


def launcher_cmd(launcher: str, nproc: int, port: int) -> list[str]:
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN]
    if launcher == "python":
        return [sys.executable, TRAIN]
    raise ValueError(launcher)


def tiny_args(run_dir_parent: str, name: str, *extra: str, steps_samples: int = 64) -> list[str]:
    """Flags for a tiny synthetic run that takes a few seconds."""
    return ["--model", TINY, "--dataset-type", "synthetic", "--train-num-samples", str(steps_samples),
            "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--warmup", "2", "--wd", "0.1",
            "--precision", "fp32", "--logs-dir", run_dir_parent, "--name", name, "--log-every-n-steps", "2",
            "--workers", "0", "--threads", "1", *extra]


def launch_train(args: list[str], nproc: int = 2, launcher: str = "deepspeed", timeout: float = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = launcher_cmd(launcher, nproc, free_port()) + list(args)
    return subprocess.run(cmd, cwd=ROOT, env=env or cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)
