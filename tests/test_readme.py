"""README.md's commands are the ones that work: it opens with the install command and
`dsclip demo`, CI runs its test command, and its quick-start `deepspeed` command trains as
written, with no accelerator setting in the environment (DeepSpeed must pick its CPU
accelerator by itself on a machine without a GPU)."""

from __future__ import annotations

import os
import re
import shlex

import pytest

from tests.launch import ROOT, free_port, run_process

with open(os.path.join(ROOT, "README.md")) as _fh:
    README = _fh.read()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_install_then_the_demo():
    first = [ln for ln in BLOCKS[0].splitlines() if ln.strip()]
    assert first == ['pip install -e ".[dev]"', "dsclip demo"]


def test_ci_runs_the_readme_test_command():
    tests = [ln for b in BLOCKS for ln in b.splitlines() if ln.startswith("python -m pytest ")]
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        ci = fh.read()
    assert tests and "grep -m1 -E '^python -m pytest ' README.md" in ci and 'eval "$cmd"' in ci
    assert tests[0] == 'python -m pytest tests -m "not gpu" -q'  # the first one is what CI picks


@pytest.mark.dist
def test_quickstart_command_trains_as_written(tmp_path):
    (cmd,) = [ln for b in BLOCKS for ln in b.splitlines() if ln.startswith("deepspeed --num_gpus 2 dsclip/train.py")]
    argv = shlex.split(cmd)
    # the only changes: a free port (tests may run side by side) and the logs dir in tmp
    argv.insert(1, f"--master_port={free_port()}")
    argv[argv.index("--logs") + 1] = str(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = run_process(argv, 600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "2 rank(s) on cpu (gloo), ZeRO-2" in proc.stdout
    assert "done: 32 steps" in proc.stdout  # 256 samples / (2 ranks x 8) x 2 epochs
    assert (tmp_path / "quickstart" / "final.safetensors").is_file()
