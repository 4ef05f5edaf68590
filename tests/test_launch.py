"""The files in launch/ stay runnable and in step with the CLI.

Static checks load every Kubernetes manifest, the SLURM script, the hostfile and the commands in
launch/README.md.  Each file's shell command runs under the environment its scheduler would give
it, with the launcher (torchrun, srun, deepspeed) replaced by a stand-in that records its argv;
the recorded launcher flags then go through the launcher's own parser and the training flags
through ``dsclip.config.parse_args`` and ``dsclip.train.validate``.

The ``dist`` tests train for real on 2 CPU ranks through the unmodified ZeRO-2 PyTorchJob
command, the sbatch script and the deepspeed launcher with a hostfile and ``--no_ssh``; only
the model and data flags are swapped for a tiny model on synthetic data.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from dsclip.config import Config, parse_args
from tests.launch import ROOT, TINY, cpu_env, free_port, run_process

LAUNCH = os.path.join(ROOT, "launch")
K8S_FILES = sorted(glob.glob(os.path.join(LAUNCH, "k8s", "*.yaml")))
SBATCH = os.path.join(LAUNCH, "slurm", "train.sbatch")
HOSTFILE = os.path.join(LAUNCH, "hostfile")
README = os.path.join(LAUNCH, "README.md")
TRAIN = "dsclip/train.py"
RUN_TIMEOUT = 300

# Appended after a launch file's own flags (argparse keeps the last value): a tiny model on
# synthetic data, 32 samples, 2 ranks x batch 4 = 4 steps, no evaluation, nothing remote.
TINY_OVERRIDES = ["--model", TINY, "--pretrained", "", "--dataset-type", "synthetic", "--train-data", "",
                  "--val-data", "", "--train-num-samples", "32", "--batch-size", "4", "--epochs", "1",
                  "--lr", "1e-3", "--warmup", "1", "--precision", "fp32", "--workers", "0", "--threads", "1",
                  "--val-frequency", "0", "--zeroshot-frequency", "0", "--no-baseline-eval",
                  "--report-to", "", "--remote-sync", "", "--log-every-n-steps", "2"]
# Variables a launcher or scheduler sets; the tests' own environment must not leak them in.
LAUNCH_VARS = re.compile(r"^(RANK|LOCAL_RANK|WORLD_SIZE|LOCAL_WORLD_SIZE|LOCAL_SIZE|MASTER_ADDR|MASTER_PORT|"
                         r"PET_\w+|SLURM_\w+|TORCHELASTIC_\w+)$")


# ---------------------------------------------------------------- helpers

def load_yaml_docs(path: str) -> list[dict]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d]


def pytorchjobs() -> list[tuple[str, dict]]:
    return [(os.path.basename(p), d) for p in K8S_FILES for d in load_yaml_docs(p)
            if d.get("kind") == "PyTorchJob"]


JOBS = pytorchjobs()
JOB_IDS = [name for name, _ in JOBS]


def job(name: str) -> dict:
    return dict(JOBS)[name]


def container_of(replica: dict) -> dict:
    return next(c for c in replica["template"]["spec"]["containers"] if c["name"] == "pytorch")


def container_script(container: dict) -> str:
    """The script of a ``bash -c SCRIPT`` container (command and args together)."""
    argv = list(container.get("command", [])) + list(container.get("args", []))
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, f"expected bash -c SCRIPT, got {argv[:2]}"
    return argv[2]


def gpu_limit(container: dict) -> int:
    return int(container["resources"]["limits"]["nvidia.com/gpu"])


def job_port(container: dict) -> int:
    return next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == "pytorchjob-port")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in cpu_env().items() if not LAUNCH_VARS.match(k)}
    env.update(extra)
    return env


def operator_env(spec: dict, name: str, rtype: str, index: int) -> dict[str, str]:
    """The variables the Kubeflow training operator (v1.7+) injects into a PyTorchJob pod."""
    replicas = spec["pytorchReplicaSpecs"]
    total = sum(r["replicas"] for r in replicas.values())
    nproc = spec.get("nprocPerNode", "auto")
    env: dict[str, str] = {}
    if "Master" in replicas:
        rank = index + (1 if rtype == "Worker" else 0)
        master_port = job_port(container_of(replicas["Master"]))
        env.update(MASTER_ADDR=f"{name}-master-0", MASTER_PORT=str(master_port),
                   WORLD_SIZE=str(total * (int(nproc) if str(nproc).isdigit() else 1)), RANK=str(rank),
                   PET_NPROC_PER_NODE=str(nproc), PET_NODE_RANK=str(rank))
    elastic = spec.get("elasticPolicy")
    if elastic:
        worker = container_of(replicas["Worker"])
        env.update(PET_RDZV_ENDPOINT=f"{elastic.get('rdzvHost', name + '-worker-0')}:"
                                     f"{elastic.get('rdzvPort', job_port(worker))}",
                   PET_RDZV_BACKEND=elastic.get("rdzvBackend", "c10d"),
                   PET_NNODES=f"{elastic['minReplicas']}:{elastic['maxReplicas']}")
        if "maxRestarts" in elastic:
            env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
        if "rdzvId" in elastic:
            env["PET_RDZV_ID"] = elastic["rdzvId"]
    else:
        env["PET_NNODES"] = str(total)
    return env


def write_tool(bin_dir: str, name: str, body: str) -> None:
    path = os.path.join(bin_dir, name)
    with open(path, "w") as fh:
        fh.write("#!/bin/bash\n" + body + "\n")
    os.chmod(path, 0o755)


def recorder(bin_dir: str, name: str, out: str) -> None:
    """A stand-in for `name` that writes its argv as JSON to `out` and succeeds."""
    write_tool(bin_dir, name, f"exec {shlex.quote(sys.executable)} -c 'import json, sys; "
                              f"json.dump(sys.argv[2:], open(sys.argv[1], \"w\"))' {shlex.quote(out)} \"$@\"")


def slurm_tools(bin_dir: str) -> None:
    write_tool(bin_dir, "scontrol", 'echo localhost')  # `scontrol show hostnames LIST`


def run_script(script: str, env: dict[str, str], bin_dir: str, args: tuple[str, ...] = (),
               timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(env, PATH=bin_dir + os.pathsep + env.get("PATH", ""))
    return run_process(["bash", "-c", script, "launch-script", *args], timeout, cwd=ROOT, env=env)


def record(tool: str, script: str, env: dict[str, str], tmp_path, args: tuple[str, ...] = ()) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    out = tmp_path / f"{tool}.argv.json"
    out.unlink(missing_ok=True)
    recorder(str(bin_dir), tool, str(out))
    slurm_tools(str(bin_dir))
    proc = run_script(script, env, str(bin_dir), args)
    assert proc.returncode == 0 and out.is_file(), proc.stdout
    return json.loads(out.read_text())


def torchrun_args(argv: list[str]):
    """Parse a torchrun argv with torchrun's own parser; the script's flags must reach the script
    untouched (torchrun's parser would take e.g. `--logs` as its `--logs-specs`)."""
    from torch.distributed.run import get_args_parser

    assert TRAIN in argv, argv
    train = argv[argv.index(TRAIN) + 1:]
    try:
        ns = get_args_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"torchrun rejects {argv}")
    assert ns.training_script == TRAIN and ns.training_script_args == train
    return ns, train


def deepspeed_args(argv: list[str]):
    from deepspeed.launcher.runner import parse_args as ds_parse

    ns = ds_parse(argv)
    assert ns.user_script == TRAIN
    return ns, list(ns.user_args)


def check_train_args(train: list[str], monkeypatch) -> Config:
    """The training flags parse and pass dsclip's own start-up validation."""
    from dsclip.train import validate

    cfg = parse_args(train)
    monkeypatch.chdir(ROOT)  # --ds_config and model-config paths are relative to the repo root
    validate(cfg)
    assert cfg.run.ds_config and os.path.isfile(os.path.join(ROOT, cfg.run.ds_config)), cfg.run.ds_config
    assert cfg.run.resume == "latest" and cfg.run.name, "a restarted job must find its own run dir"
    if cfg.model.pretrained:
        import open_clip

        assert cfg.model.pretrained in open_clip.list_pretrained_tags_by_model(cfg.model.model)
    return cfg


# ---------------------------------------------------------------- Kubernetes manifests

def test_k8s_manifests_load():
    assert len(JOBS) >= 3, "expected ZeRO-2, ZeRO-3 and elastic PyTorchJobs"
    for path in K8S_FILES:
        for doc in load_yaml_docs(path):
            assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
    scripts = " ".join(container_script(container_of(rep)) for _, d in JOBS
                       for rep in d["spec"]["pytorchReplicaSpecs"].values())
    assert "ds_configs/zero2.json" in scripts and "ds_configs/zero3.json" in scripts
    assert any("elasticPolicy" in d["spec"] for _, d in JOBS)


@pytest.mark.parametrize("name", JOB_IDS)
def test_pytorchjob_spec(name):
    doc = job(name)
    assert doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "PyTorchJob"
    # the operator derives pod and service names from it: an RFC 1035 label
    assert re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    elastic = spec.get("elasticPolicy")
    assert set(replicas) <= {"Master", "Worker"}
    assert "Worker" in replicas
    if elastic:
        assert elastic["rdzvBackend"] == "c10d"
        assert elastic["minReplicas"] <= replicas["Worker"]["replicas"] <= elastic["maxReplicas"]
        assert "nProcPerNode" not in elastic, "deprecated; use spec.nprocPerNode"
    else:
        assert replicas["Master"]["replicas"] == 1
    claims = {d["metadata"]["name"] for p in K8S_FILES for d in load_yaml_docs(p)
              if d["kind"] == "PersistentVolumeClaim"}
    for rtype, rep in replicas.items():
        assert isinstance(rep["replicas"], int) and rep["replicas"] >= 1, rtype
        assert rep["restartPolicy"] in ("OnFailure", "Always", "ExitCode", "Never"), rtype
        pod = rep["template"]["spec"]
        c = container_of(rep)
        assert gpu_limit(c) >= 1
        if str(spec.get("nprocPerNode", "")).isdigit():
            assert int(spec["nprocPerNode"]) == gpu_limit(c), "one rank per GPU"
        assert job_port(c) > 0
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        shm = volumes[mounts["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory"
        pvcs = [v["persistentVolumeClaim"]["claimName"] for v in volumes.values()
                if "persistentVolumeClaim" in v]
        assert pvcs and set(pvcs) <= claims, "checkpoint volume must be a PVC defined in launch/k8s/"
        env = {e["name"]: e for e in c["env"]}
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] and "value" not in env[var]
        if "AWS_ENDPOINT_URL" in env:
            assert env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"].get("optional") is True


@pytest.mark.parametrize("name", JOB_IDS)
def test_pytorchjob_command(name, tmp_path, monkeypatch):
    """Every pod's command, run under the operator's environment, hands torchrun a valid command
    line and dsclip a valid config whose checkpoints land on the shared volume."""
    doc = job(name)
    spec = doc["spec"]
    for rtype, rep in spec["pytorchReplicaSpecs"].items():
        for index in sorted({0, rep["replicas"] - 1}):
            c = container_of(rep)
            env = clean_env(**{e["name"]: e["value"] for e in c.get("env", []) if "value" in e},
                            **operator_env(spec, doc["metadata"]["name"], rtype, index))
            argv = record("torchrun", container_script(c), env, tmp_path)
            ns, train = torchrun_args(argv)
            assert int(ns.nproc_per_node) == gpu_limit(c)
            if spec.get("elasticPolicy"):
                assert ns.rdzv_backend == "c10d" and ns.rdzv_endpoint == env["PET_RDZV_ENDPOINT"]
                assert ns.nnodes == env["PET_NNODES"]
            else:
                total = sum(r["replicas"] for r in spec["pytorchReplicaSpecs"].values())
                assert int(ns.nnodes) == total
                assert ns.node_rank == index + (rtype == "Worker")
                assert (ns.master_addr, ns.master_port) == (env["MASTER_ADDR"], int(env["MASTER_PORT"]))
            cfg = check_train_args(train, monkeypatch)
            mounts = [m["mountPath"] for m in c["volumeMounts"] if m["mountPath"] != "/dev/shm"]
            assert any(cfg.run.logs.startswith(m.rstrip("/") + "/") for m in mounts), cfg.run.logs
            assert (cfg.run.remote_sync or "").startswith("s3://")


# ---------------------------------------------------------------- SLURM, hostfile, README

def sbatch_directives() -> dict[str, str]:
    out = {}
    with open(SBATCH) as fh:
        for line in fh:
            if line.startswith("#SBATCH"):
                m = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?\s*", line)
                assert m, f"unexpected #SBATCH line: {line!r}"
                out[m.group(1)] = m.group(2) or ""
    return out


def slurm_env(nodes: int, gpus: int, **extra: str) -> dict[str, str]:
    return clean_env(SLURM_JOB_NODELIST="localhost", SLURM_NNODES=str(nodes), SLURM_JOB_ID="4242",
                     SLURM_GPUS_ON_NODE=str(gpus), SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NAME="dsclip",
                     SLURM_CPUS_PER_TASK="2", **extra)


def srun_command(argv: list[str]) -> list[str]:
    """Strip srun's own options (written as single `--key=value` tokens)."""
    i = 0
    while argv[i].startswith("-"):
        i += 1
    return argv[i:]


def test_sbatch_script(tmp_path, monkeypatch):
    directives = sbatch_directives()
    assert directives["ntasks-per-node"] == "1", "one torchrun per node"
    nodes, gpus = int(directives["nodes"]), int(directives["gpus-per-node"])
    assert "time" in directives and "requeue" in directives
    with open(SBATCH) as fh:
        script = fh.read()
    assert subprocess.run(["bash", "-n", SBATCH], check=False).returncode == 0
    # flags after the script name reach dsclip last, so they override
    srun = record("srun", script, slurm_env(nodes, gpus), tmp_path, args=("--epochs", "3"))
    cmd = srun_command(srun)
    assert cmd[0] == "torchrun", cmd
    ns, train = torchrun_args(cmd[1:])
    assert int(ns.nnodes) == nodes and int(ns.nproc_per_node) == gpus
    assert ns.rdzv_backend == "c10d" and ns.rdzv_endpoint.startswith("localhost:") and ns.rdzv_id == "4242"
    cfg = check_train_args(train, monkeypatch)
    assert cfg.optim.epochs == 3
    assert os.path.isabs(cfg.run.logs)


def test_hostfile():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(HOSTFILE)
    assert pool and all(slots > 0 for slots in pool.values())
    with open(HOSTFILE) as fh:
        for line in fh:
            assert re.fullmatch(r"(#.*|\s*|\S+ slots=\d+)\n?", line), line


def readme_blocks() -> list[str]:
    with open(README) as fh:
        blocks = re.findall(r"```bash\n(.*?)```", fh.read(), flags=re.DOTALL)
    assert blocks
    return blocks


def test_readme_commands(monkeypatch):
    """The README's launcher commands parse with each launcher's own parser, and its shared
    training flags are valid."""
    blocks = readme_blocks()
    defs = next(b for b in blocks if b.startswith("TRAIN_ARGS=("))
    # evaluate the bash array exactly as a shell would
    out = subprocess.run(["bash", "-c", f"{defs}\nprintf '%s\\0' \"${{TRAIN_ARGS[@]}}\""], text=True,
                         stdout=subprocess.PIPE, check=True).stdout
    check_train_args(out.split("\0")[:-1], monkeypatch)
    cmds = [ln.strip() for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    launches = [c for c in cmds if TRAIN in c]
    assert {c.split()[0] for c in launches} == {"deepspeed", "torchrun"}
    for c in launches:
        argv = [a for a in shlex.split(c) if a != "${TRAIN_ARGS[@]}"]
        tool, rest = argv[0], argv[1:]
        if tool == "deepspeed":
            ns, extra = deepspeed_args(rest)
            if ns.no_ssh:
                assert ns.node_rank >= 0 and ns.master_addr, c
        else:
            ns, extra = torchrun_args(rest)
        assert extra == [], f"training flags belong in TRAIN_ARGS: {c}"
        assert c.endswith('"${TRAIN_ARGS[@]}"'), c
    launched = " ".join(launches)
    for needed in ("--hostfile launch/hostfile", "--no_ssh", "--rdzv_backend c10d"):
        assert needed in launched


# ---------------------------------------------------------------- real 2-rank runs

def assert_trained(proc: subprocess.CompletedProcess, run_dir) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "2 rank(s)" in proc.stdout, proc.stdout[-4000:]
    assert (run_dir / "final.safetensors").is_file()


def torchrun_tool(bin_dir: str, *append: str) -> None:
    """`torchrun` that runs this interpreter's torch.distributed.run and appends flags to the
    training script's command line."""
    extra = " ".join(shlex.quote(a) for a in append)
    python = shlex.quote(sys.executable)
    write_tool(bin_dir, "torchrun", f'exec {python} -m torch.distributed.run "$@" {extra}')


@pytest.mark.dist
def test_pytorchjob_zero2_trains(tmp_path):
    """The ZeRO-2 manifest's container command, unmodified, on one 'pod' with 2 CPU ranks: the
    operator's variables (WORLD_SIZE and RANK describe the pod, not the rank; no LOCAL_RANK)
    must not leak into dsclip, and `--resume latest` must start fresh when nothing is saved."""
    name = "pytorchjob-zero2.yaml"
    c = container_of(job(name)["spec"]["pytorchReplicaSpecs"]["Master"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torchrun_tool(str(bin_dir), *TINY_OVERRIDES, "--logs-dir", str(tmp_path), "--name", "k8s")
    env = clean_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="1", RANK="0",
                    PET_NNODES="1", PET_NPROC_PER_NODE="2", PET_NODE_RANK="0")
    proc = run_script(container_script(c), env, str(bin_dir), timeout=RUN_TIMEOUT)
    assert_trained(proc, tmp_path / "k8s")
    assert "ZeRO-2" in proc.stdout and "starting from scratch" in proc.stdout


@pytest.mark.dist
def test_sbatch_trains(tmp_path):
    """train.sbatch with a pass-through `srun` on one 'node' of 2 CPU ranks: c10d rendezvous,
    extra flags after the script name appended to the dsclip command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_tool(str(bin_dir), "srun", 'while [[ $# -gt 0 && $1 == -* ]]; do shift; done\nexec "$@"')
    slurm_tools(str(bin_dir))
    torchrun_tool(str(bin_dir))
    with open(SBATCH) as fh:
        script = fh.read()
    env = slurm_env(1, 2, RDZV_PORT=str(free_port()))
    proc = run_script(script, env, str(bin_dir), args=(*TINY_OVERRIDES, "--logs-dir", str(tmp_path),
                                                        "--name", "slurm"), timeout=RUN_TIMEOUT)
    assert_trained(proc, tmp_path / "slurm")


@pytest.mark.dist
@pytest.mark.slow  # two more interpreters (runner, per-node launcher) than torchrun: 50-90 s on 2 busy cores
def test_deepspeed_hostfile_no_ssh(tmp_path):
    """The deepspeed launcher reading a hostfile, started per node with --no_ssh --node_rank."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one local 'node' with 2 CPU ranks\nlocalhost slots=2\n")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
           "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), TRAIN,
           "--ds_config", "ds_configs/zero2.json", *TINY_OVERRIDES,
           "--logs-dir", str(tmp_path), "--name", "ds"]
    proc = run_process(cmd, RUN_TIMEOUT, cwd=ROOT, env=clean_env())
    assert_trained(proc, tmp_path / "ds")
