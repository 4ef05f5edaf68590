"""The progress line, train metrics, and per-rank memory reporting."""

from __future__ import annotations

import time
from typing import Any

from dsclip.data import global_stats


def memory_kib(field: str) -> int:
    """A /proc/self/status memory field in KiB (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class ProgressMeter:
    """Times data waits and steps; prints the progress line and logs train metrics."""

    def __init__(self, run: Any):
        self.run, self.losses = run, []
        self.t_window = self.t_last = time.perf_counter()
        self.data_wait = 0.0
        self.last_step = run.state.step

    def next_batch(self, it) -> dict:
        t = time.perf_counter()
        batch = next(it)
        self.data_wait += time.perf_counter() - t
        return batch

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def report(self) -> None:
        import torch
        import torch.distributed as dist

        run, s, cfg = self.run, self.run.state, self.run.cfg
        now = time.perf_counter()
        window = max(now - self.t_window, 1e-9)
        steps = max(1, s.step - self.last_step)
        self.last_step = s.step
        vals = torch.tensor([sum(self.losses) / max(1, len(self.losses)), self.data_wait / window],
                            dtype=torch.float64)
        dist.all_reduce(vals)
        vals /= run.ctx.world
        loss, wait = vals.tolist()
        run.last_train_loss = loss
        global_batch = cfg.optim.batch_size * cfg.optim.accum_freq * run.ctx.world
        sps = steps * global_batch / window
        eta = (run.total_steps - s.step) * window / steps
        lr = run.lr.current_lrs()[0]
        stats = global_stats(run.source)  # every rank's counts, not just this one's
        metrics = {"loss": loss, "lr": lr, "samples_per_s": sps, "samples_per_s_per_rank": sps / run.ctx.world,
                   "data_wait_frac": wait, "logit_scale": float(run.engine.module.logit_scale.data.reshape(-1)[0])
                   if run.engine.module.logit_scale.data.numel() else float("nan")}
        metrics.update(data_metrics(stats))
        run.logger.log(metrics, step=s.step, kind="train", epoch=s.epoch)
        if run.ctx.is_main:
            skipped = f" {format_skips(stats)}" if stats.get("skipped") else ""
            print(f"epoch {s.epoch + 1}/{run.epochs} step {s.step}/{run.total_steps} "
                  f"({100 * s.step / run.total_steps:.0f}%) loss {loss:.4f} lr {lr:.3g} "
                  f"samples/s {sps:.1f} ({sps / run.ctx.world:.1f}/rank) data {100 * wait:.0f}%{skipped} "
                  f"eta {_fmt_eta(eta)}", flush=True)
        self.losses, self.data_wait, self.t_window = [], 0.0, now


def data_metrics(stats: dict[str, Any], worst: int = 5) -> dict[str, Any]:
    """``data/...`` metrics from the reader's counters: totals, ``data/skipped/<kind>`` and, as one
    structured value for results.jsonl, ``data/worst_shards`` ({shard: {kind: count}})."""
    from dsclip.data.skips import worst_shards

    out: dict[str, Any] = {f"data/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}
    out.update({f"data/skipped/{kind}": n for kind, n in stats.get("by_kind", {}).items()})
    shards = worst_shards(stats, worst)
    if shards:
        out["data/worst_shards"] = dict(shards)
    return out


def format_skips(stats: dict[str, Any]) -> str:
    """``skipped 6 (bad_image 1, corrupt_tar 1, ...; worst cut.tar 4, mixed.tar 2)`` for the progress line."""
    from dsclip.data.skips import worst_shards

    kinds = ", ".join(f"{k} {n}" for k, n in stats.get("by_kind", {}).items())
    worst = ", ".join(f"{shard} {sum(k.values())}" for shard, k in worst_shards(stats, 3))
    return f"skipped {stats['skipped']} ({kinds}; worst {worst})"


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def report_memory(run: Any) -> None:
    """Every rank's peak RSS, and how much of it the training state added over the framework."""
    import torch
    import torch.distributed as dist

    mine = torch.tensor([memory_kib("VmHWM"), run.rss_at_start], dtype=torch.float64)
    rows = [torch.zeros_like(mine) for _ in range(run.ctx.world)]
    dist.all_gather(rows, mine)
    gib = 1024 ** 2
    peaks = {f"mem/peak_rss_gib_rank{r}": float(v[0]) / gib for r, v in enumerate(rows)}
    added = {f"mem/train_state_gib_rank{r}": float(v[0] - v[1]) / gib for r, v in enumerate(rows)}
    run.logger.log({**peaks, **added}, step=run.state.step, kind="summary", epoch=run.state.epoch)
    if run.ctx.is_main:
        print("[dsclip] peak memory per rank: " + ", ".join(
            f"rank {r} {float(v[0]) / gib:.2f} GiB (+{float(v[0] - v[1]) / gib:.2f} over start)"
            for r, v in enumerate(rows)), flush=True)
