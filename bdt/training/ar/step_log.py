"""The AR trainer's log records: per-rank sums between two log steps (LogWindow), reduced over
the ranks into one record of loss means, rates, MFU and data counters (log_window_means)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from bdt.training.distributed import DistInfo, all_reduce_mean
from bdt.training.metrics import MetricsLogger, Throughput


@dataclass
class LogWindow:
    """Per-rank sums between two log steps."""

    sums: dict[str, float] = field(default_factory=dict)
    micro: int = 0
    steps: int = 0
    flops: float = 0.0
    t0: float = field(default_factory=time.perf_counter)
    grad_norm: float | None = None  # only set where DeepSpeed does not report it
    lr: float = 0.0  # the LR the window's last optimizer step applied

    def add(self, values: dict[str, float]) -> None:
        self.micro += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def state_dict(self) -> dict:
        """What a checkpoint keeps of a window that is not logged yet: its loss sums, so a resumed
        run logs the uninterrupted run's means (timings restart: they measure this process)."""
        return {"sums": self.sums, "micro": self.micro, "grad_norm": self.grad_norm,
                "lr": self.lr}


def log_window_means(logger: MetricsLogger, step: int, engine, window: LogWindow, meter: Throughput, stream,
         seen: dict, peak: float, dist: DistInfo, last_step_s: float, partial: bool) -> None:
    """Window means of the losses (over micro-batches and ranks), rates, MFU, data stats."""
    n = max(window.micro, 1)
    elapsed = max(time.perf_counter() - window.t0, 1e-9)
    rates = meter.report(1)
    local = {k: v / n for k, v in window.sums.items()}
    local.update(mfu=window.flops / elapsed / peak, tokens_per_s=rates.get("tokens_per_s_rank", 0.0),
                 images_per_s=rates["items_per_s_rank"], tokens_seen=seen["tokens"],
                 images_seen=seen["images"], flops_seen=seen["flops"], data_wait_frac=rates["data_wait_frac"],
                 pack_efficiency=stream.counters.efficiency,
                 samples_read=stream.counters.samples_read, corrupt=stream.counters.corrupt,
                 oversize=stream.counters.oversize, wrong_bits=stream.counters.wrong_bits,
                 bad_grid=stream.counters.bad_grid)
    mean = all_reduce_mean(local, dist.device)
    W = dist.world_size
    out = {k: mean[k] for k in ("loss", "text_ce", "vision", "bit_accuracy", "mfu",
                                "data_wait_frac", "pack_efficiency")}
    norm = engine.get_global_grad_norm()
    norm = window.grad_norm if norm is None else float(norm)
    out.update(lr=window.lr, grad_norm=norm if norm is not None else float("nan"),
               step_time_s=elapsed / max(window.steps, 1), last_step_s=last_step_s,
               tokens_per_s=mean["tokens_per_s"] * W, images_per_s=mean["images_per_s"] * W,
               tokens_per_s_rank=local["tokens_per_s"], images_per_s_rank=local["images_per_s"],
               tokens_seen=mean["tokens_seen"] * W, images_seen=mean["images_seen"] * W,
               flops_seen=mean["flops_seen"] * W)
    out.update({f"data/{k}": mean[k] * W
                for k in ("samples_read", "corrupt", "oversize", "wrong_bits", "bad_grid")})
    if partial:
        out["window_partial"] = 1
    logger.log(step, out)

