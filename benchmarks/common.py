"""Shared pieces of the training benchmarks (throughput, efficiency, memory).

* ``launch_dsclip``: runs the real ``dsclip/train.py`` loop (1 process or torchrun ranks) under
  a thin instrumenting wrapper (this file run as a script).  The wrapper times, per optimizer
  step, the data wait, ``engine.forward``, ``engine.backward``, ``engine.step`` and the time spent
  inside blocking ``deepspeed.comm`` collectives; it records VmRSS/VmHWM from ``/proc/self/status``
  and skips the end-of-run checkpoint and export, which are not training steps.
* ``launch_open_clip``: runs ``open_clip_train.main`` in one process and reads its per-step
  ``Data (t)`` / ``Batch (t)`` log lines.
* ``matmul_peak``: dense fp32 matmul FLOP/s for given shapes on this device.
* ``hardware`` / ``write_report``: the JSON + markdown record every benchmark leaves behind.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "dsclip" / "train.py"
TINY_MODEL = str(ROOT / "tests" / "assets" / "tiny-clip.json")
DEFAULT_OUT = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "ds_configs"


# ---------------------------------------------------------------- environment and reports

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hardware() -> dict[str, Any]:
    import deepspeed
    import open_clip
    import torch

    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "affinity": len(os.sched_getaffinity(0)),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "hostname": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "open_clip": open_clip.__version__,
            "load_avg_at_start": os.getloadavg()}


def md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(out: str | os.PathLike, name: str, title: str, config: dict[str, Any], results: dict[str, Any],
                 sections: list[str]) -> dict[str, Any]:
    """Write ``NAME.json`` and ``NAME.md`` (title, then each markdown section, then the record)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    report = {"benchmark": name, "date": dt.datetime.now().isoformat(timespec="seconds"), "hardware": hw,
              "config": config, **results}
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str))
    head = (f"# {title}\n\n{report['date']} on {hw['cpu_model']} ({hw['cpu_count']} CPUs, load avg at start "
            f"{', '.join(f'{x:.1f}' for x in hw['load_avg_at_start'])}); torch {hw['torch']}, deepspeed "
            f"{hw['deepspeed']}, open_clip {hw['open_clip']}, Python {hw['python']}.\n\n"
            f"Config: `{json.dumps(config, default=str)}`\n")
    (out / f"{name}.md").write_text(head + "\n" + "\n\n".join(sections) + "\n")
    return report


def median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------- dsclip launches

def run_job(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run a job (launcher and ranks) in its own session, stdout+stderr merged; on a timeout, or
    when the launcher exits first, no rank is left running."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc)
        out, _ = proc.communicate()
        raise RuntimeError(f"{' '.join(cmd[:6])} ... still running after {timeout:.0f}s; killed:\n{out[-4000:]}") from None
    finally:
        _kill_session(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


def _kill_session(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra or {})
    return env


def dsclip_args(model: str, batch: int, steps: int, zero: str, threads: int, logs: str, name: str,
                precision: str = "fp32", extra: tuple[str, ...] = ()) -> list[str]:
    cfg = zero if zero.endswith(".json") else str(CONFIGS / f"{zero}.json")
    return ["--model", model, "--dataset-type", "synthetic", "--train-num-samples", str(batch * steps * 64),
            "--batch-size", str(batch), "--max-steps", str(steps), "--epochs", "1", "--precision", precision,
            "--ds_config", cfg, "--threads", str(threads), "--lr", "1e-4", "--warmup", "0",
            "--log-every-n-steps", "1", "--val-frequency", "0", "--zeroshot-frequency", "0",
            "--no-baseline-eval", "--workers", "0", "--logs-dir", logs, "--name", name, *extra]


def launch_dsclip(model: str, batch: int, steps: int, zero: str = "zero2", nproc: int = 1, threads: int = 1,
                  warmup: int = 1, timeout: float = 900, env: dict[str, str] | None = None,
                  precision: str = "fp32") -> dict[str, Any]:
    """Run ``steps`` real dsclip training steps; return samples/s (median over the steps after
    ``warmup``, from the trainer's own results.jsonl) and each rank's timing/memory record."""
    with tempfile.TemporaryDirectory(prefix="dsclip-bench-") as tmp:
        stats = os.path.join(tmp, "stats")
        os.makedirs(stats)
        args = dsclip_args(model, batch, steps, zero, threads, tmp, "run", precision)
        wrapper = [str(Path(__file__).resolve()), stats]
        if nproc == 1:
            cmd = [sys.executable, *wrapper, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                   "127.0.0.1", "--master_port", str(_free_port()), *wrapper, *args]
        t0 = time.perf_counter()
        proc = run_job(cmd, timeout, cwd=ROOT, env=_env(threads, env))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"dsclip run failed (exit {proc.returncode}; {' '.join(cmd)}):\n{proc.stdout[-4000:]}")
        records = [json.loads(line) for line in Path(tmp, "run", "results.jsonl").read_text().splitlines()]
        train = [r for r in records if "samples_per_s" in r]
        ranks = [json.loads(Path(stats, f).read_text()) for f in sorted(os.listdir(stats))]
    measured = train[warmup:] or train
    return {"samples_per_s": median([r["samples_per_s"] for r in measured]),
            "samples_per_s_steps": [r["samples_per_s"] for r in train],
            "data_wait_frac": median([r.get("data_wait_frac", float("nan")) for r in measured]),
            "ranks": ranks, "breakdown": breakdown(ranks, warmup), "wall_s": wall, "nproc": nproc, "zero": zero,
            "batch_per_rank": batch, "threads_per_rank": threads}


PHASES = ("data", "forward", "backward", "step", "comm", "other")


def breakdown(ranks: list[dict], warmup: int) -> dict[str, float]:
    """Mean seconds per step of each phase over the ranks (median over the measured steps)."""
    out: dict[str, float] = {}
    for key in (*PHASES, "total"):
        per_rank = [median([s[key] for s in r["steps"][warmup:] or r["steps"]]) for r in ranks if r["steps"]]
        out[key] = sum(per_rank) / len(per_rank) if per_rank else float("nan")
    return out


def format_breakdown(b: dict[str, float]) -> str:
    tot = b.get("total") or float("nan")
    return " ".join(f"{k} {b[k]:.3f}s ({100 * b[k] / tot:.0f}%)" for k in PHASES) + f" | step {tot:.3f}s"


# ---------------------------------------------------------------- open_clip_train launches

_OC_LINE = re.compile(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)")


def launch_open_clip(model: str, batch: int, steps: int, threads: int, warmup: int = 1,
                     timeout: float = 900) -> dict[str, Any]:
    """open_clip_train in one process on CPU (its DDP wrapper passes device_ids=[cpu], which fails
    with more than one rank, so only the single-process case is comparable).  With
    ``--log-every-n-steps 1`` its meters reset every step, so each log line is one step's time."""
    with tempfile.TemporaryDirectory(prefix="oc-bench-") as tmp:
        if model.endswith(".json"):  # open_clip_train takes names only: register the config dir
            name = Path(model).stem
            pre = (f"import open_clip; open_clip.add_model_config({str(Path(model).parent)!r}); ")
        else:
            name, pre = model, ""
        argv = ["--device", "cpu", "--model", name, "--dataset-type", "synthetic", "--train-num-samples",
                str(batch * steps), "--batch-size", str(batch), "--epochs", "1", "--precision", "fp32",
                "--workers", "0", "--local-loss", "--gather-with-grad", "--log-every-n-steps", "1",
                "--lr", "1e-4", "--warmup", "0", "--logs", "none", "--name", "oc", "--seed", "0"]
        code = pre + f"from open_clip_train.main import main; main({argv!r})"
        t0 = time.perf_counter()
        proc = run_job([sys.executable, "-c", code], timeout, cwd=tmp, env=_env(threads))
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip_train failed (exit {proc.returncode}; -9 is SIGKILL, e.g. out of memory):\n{proc.stdout[-4000:]}")
    steps_t = [(float(d), float(b)) for d, b in _OC_LINE.findall(proc.stdout)]
    # the first line is logged at batch 0, after one step: it is the warm-up step
    measured = steps_t[warmup:] or steps_t
    if not measured:
        raise RuntimeError(f"no step timings in open_clip_train output:\n{proc.stdout[-3000:]}")
    return {"samples_per_s": batch / median([b for _, b in measured]),
            "samples_per_s_steps": [batch / b for _, b in steps_t],
            "data_wait_frac": median([d / b for d, b in measured]), "wall_s": wall, "batch": batch,
            "threads": threads}


# ---------------------------------------------------------------- matmul peak

def matmul_peak(shapes: list[tuple[int, int, int]], threads: int, repeats: int = 5,
                min_time: float = 0.3) -> list[dict[str, Any]]:
    """fp32 FLOP/s of ``(m,k) @ (k,n)`` for each shape, best-of-``repeats`` timing windows."""
    import torch

    torch.set_num_threads(threads)
    rows = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        c = a @ b  # warm-up, allocates the output
        rates = []
        for _ in range(repeats):
            it, t0 = 0, time.perf_counter()
            while True:
                torch.mm(a, b, out=c)
                it += 1
                el = time.perf_counter() - t0
                if el >= min_time:
                    break
            rates.append(2.0 * m * k * n * it / el)
        rows.append({"shape": f"{m}x{k}@{k}x{n}", "best_flops": max(rates), "median_flops": median(rates)})
    return rows


# ---------------------------------------------------------------- the instrumenting wrapper (script mode)

def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _worker(stats_dir: str, argv: list[str]) -> int:
    import deepspeed.comm as dscomm

    import dsclip.model as dsmodel
    import dsclip.train as T

    rec: dict[str, Any] = {"steps": []}
    cur = dict.fromkeys(PHASES, 0.0)
    clock = {"last_end": None}

    def timed(key: str, fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                cur[key] += time.perf_counter() - t
        return inner

    # blocking collectives issued through deepspeed.comm (ZeRO's reductions and gathers); the
    # CLIP loss's feature gather goes through torch.distributed directly and stays in "forward"
    for op in ("all_reduce", "reduce_scatter_fn", "reduce_scatter_tensor", "all_gather_into_tensor",
               "allgather_fn", "all_gather", "broadcast", "reduce", "all_to_all_single", "reduce_scatter"):
        if hasattr(dscomm, op):
            setattr(dscomm, op, timed("comm", getattr(dscomm, op)))

    create = dsmodel.create_model

    def create_model(*a, **k):
        rec["rss_before_model_kb"] = _proc_status_kb("VmRSS")
        return create(*a, **k)

    dsmodel.create_model = create_model
    setup = T.setup

    def instrumented_setup(cfg):
        run = setup(cfg)
        rec["rss_after_setup_kb"] = _proc_status_kb("VmRSS")
        rec["hwm_after_setup_kb"] = _proc_status_kb("VmHWM")
        eng = run.engine
        fwd, bwd, stp = eng.forward, eng.backward, eng.step
        eng.forward, eng.backward = timed("forward", fwd), timed("backward", bwd)

        def step(*a, **k):
            t = time.perf_counter()
            comm0 = cur["comm"]
            out = stp(*a, **k)
            end = time.perf_counter()
            cur["step"] += end - t
            if clock["last_end"] is not None:
                total = end - clock["last_end"]
                row = {**cur, "total": total}
                # comm happened inside backward/step; report it separately, not twice
                row["other"] = total - sum(cur[p] for p in ("data", "forward", "backward", "step"))
                row["comm_in_step"] = cur["comm"] - comm0
                rec["steps"].append(row)
            else:
                rec["first_step_s"] = end - t
            clock["last_end"] = end
            cur.update(dict.fromkeys(PHASES, 0.0))
            return out

        eng.step = step
        clock["last_end"] = time.perf_counter()
        return run

    T.setup = instrumented_setup
    meter_next = T.ProgressMeter.next_batch

    def next_batch(self, it):
        t = time.perf_counter()
        try:
            return meter_next(self, it)
        finally:
            cur["data"] += time.perf_counter() - t

    T.ProgressMeter.next_batch = next_batch

    def finish(run):
        """Record, then end without the final checkpoint and export (not part of training)."""
        import torch.distributed as dist

        rec.update({"rank": run.ctx.rank, "world": run.ctx.world, "hwm_kb": _proc_status_kb("VmHWM"),
                    "rss_end_kb": _proc_status_kb("VmRSS"),
                    "params": sum(getattr(p, "ds_numel", p.numel()) for p in run.bundle.model.parameters()),
                    "zero_stage": run.meta["zero_stage"]})
        with open(os.path.join(stats_dir, f"rank{run.ctx.rank}.json"), "w") as fh:
            json.dump(rec, fh)
        dist.barrier()
        run.watchdog.close()
        run.logger.close()
        return {"run_dir": run.run_dir, "step": run.state.step}

    T.finish = finish
    return T.main(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(_worker(sys.argv[1], sys.argv[2:]))
