"""Metrics: one log line, a JSONL record and TensorBoard scalars per log step (rank 0 only),
plus timers for step time, data-wait time and throughput."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes on the main rank only; other ranks hold a no-op logger so callers need no branches."""

    def __init__(self, out_dir: str | None, enabled: bool, tensorboard: bool = True,
                 jsonl_name: str = "metrics.jsonl"):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled or out_dir is None:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, jsonl_name)
        _drop_partial_line(path)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Scalars to all sinks; keys containing '/' (per-bit, per-group series) skip the log."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        log.info("step %d %s", step, " ".join(f"{prefix}{k}={_fmt(v)}"
                                              for k, v in scalars.items() if "/" not in k))
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "time": time.time(),
                                          **{prefix + k: v for k, v in scalars.items()}}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _drop_partial_line(path: str) -> None:
    """A job killed mid-write leaves half a record at the end; the resumed run's records would
    follow it on the same line, and the file would no longer parse as JSON lines."""
    try:
        with open(path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(0, end - (1 << 20))  # a record is far shorter than the tail read
            f.seek(start)
            tail = f.read()
            if tail and not tail.endswith(b"\n"):
                cut = tail.rfind(b"\n")
                f.truncate(start + cut + 1 if cut >= 0 else start)
    except FileNotFoundError:
        pass


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"


class Throughput:
    """Accumulates step time, data-wait time and item counts between two `report()` calls."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._t0 = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0
        self.items = 0
        self.tokens = 0

    def add_data_wait(self, seconds: float) -> None:
        self.data_wait += seconds

    def add_step(self, items: int, tokens: int = 0) -> None:
        self.steps += 1
        self.items += items
        self.tokens += tokens

    def report(self, world_size: int = 1) -> dict[str, float]:
        """Per-rank rates and totals (assuming ranks progress in lockstep), then reset."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        out = {"step_time_s": elapsed / max(self.steps, 1),
               "data_wait_frac": self.data_wait / elapsed,
               "items_per_s_rank": self.items / elapsed,
               "items_per_s": self.items * world_size / elapsed}
        if self.tokens:
            out["tokens_per_s_rank"] = self.tokens / elapsed
            out["tokens_per_s"] = self.tokens * world_size / elapsed
        self.reset()
        return out


class Timer:
    """`with Timer() as t: ...` then `t.seconds`."""

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
