"""Metrics: one log line, a JSONL record and TensorBoard scalars per log step (rank 0 only),
plus timers for step time, data-wait time and throughput."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any

from bdt import storage

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes on the main rank only; other ranks hold a no-op logger so callers need no branches."""

    def __init__(self, out_dir: str | None, enabled: bool, tensorboard: bool = True,
                 jsonl_name: str = "metrics.jsonl", keep_through_step: int | None = None):
        """keep_through_step: the step this run continues from (-1 for a fresh start). What an
        earlier run logged past it is history this run replaces: the JSONL file is cut back to
        the records up to it and TensorBoard hides the later events. None keeps every whole
        record."""
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled or out_dir is None:
            return
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, jsonl_name)
        # A torn last line (a kill mid-write) goes in any case: the next record would join it.
        kept = cut_records_after(path, math.inf if keep_through_step is None else keep_through_step)
        self._jsonl = open(path, "a", buffering=1)
        self._jsonl_path = path
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Purged from the resume step itself (a partial window logged there is cut from the
            # JSONL), then its kept records written again: TensorBoard shows what the JSONL does.
            purge = None if keep_through_step is None else max(keep_through_step, 0)
            self._tb = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"), purge_step=purge)
            if keep_through_step is not None:
                _write_again(self._tb, kept, keep_through_step)

    def log(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Scalars to all sinks; keys containing '/' (per-bit, per-group series) skip the log."""
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        log.info("step %d %s", step, " ".join(f"{prefix}{k}={_fmt(v)}"
                                              for k, v in scalars.items() if "/" not in k))
        if self._jsonl is not None:
            record = {"step": step, "time": time.time(), **{prefix + k: v for k, v in scalars.items()}}
            try:
                with storage.naming_url(self._jsonl_path, "appending to"):  # a full disk: which file
                    self._jsonl.write(json.dumps(record) + "\n")
            except OSError:
                # Its buffer keeps what failed: a close would fail again, and the caller's close
                # in a `finally` replaced this error with a bare "No space left on device".
                with contextlib.suppress(OSError):
                    self._jsonl.close()
                self._jsonl = None
                raise
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


def cut_records_after(path: str, last_step: float) -> list:
    """Keep the records of `path` logged for steps <= last_step (but a partial window's at
    last_step, which the resumed run logs whole), atomically (a kill leaves the old file or the
    new one); returns them parsed. A torn last line (a kill mid-write) goes; lines without a
    numeric step stay: they are not on the step axis, so nothing says they are replaced."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if torn and _parsed(torn) is not _UNPARSABLE:
        lines.append(torn)  # whole after all: only its newline was lost
    parsed = [(line, _parsed(line)) for line in lines]
    kept = [(line, rec) for line, rec in parsed if _kept(rec, last_step)]
    out = b"".join(line + b"\n" for line, _ in kept)
    if out != data:
        storage.write_bytes_atomic(path, out)
    return [rec for _, rec in kept]


_UNPARSABLE = object()


def _parsed(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: garbage nested past the parser
        return _UNPARSABLE


def open_line_log(path: str):
    """`path` opened to append one record a line (line-buffered), its torn last line dropped
    first: a writer killed mid-line (or stopped by a full disk) left part of a record there, and
    the next record would join it, one line that no reader can parse."""
    drop_torn_line(path)
    return open(path, "a", buffering=1)


def drop_torn_line(path: str, chunk: int = 1 << 16) -> None:
    """Cut `path` back to its last newline (nothing when it ends with one or does not exist);
    reads only its tail, so a long log costs nothing."""
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block the open
        raise OSError(f"{path}: not a regular file, so no log can be appended to it")
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        end = pos = f.seek(0, os.SEEK_END)
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            newline = f.read(pos - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            pos = start
        if keep != end:
            f.truncate(keep)
            log.warning("%s: dropped a torn last line (%d bytes, no newline): a writer was "
                        "stopped mid-record", path, end - keep)


def _write_again(tb, records: list, step: int) -> None:
    """The scalars of the records logged at `step`, to TensorBoard as first logged."""
    for rec in records:
        if isinstance(rec, dict) and rec.get("step") == step:
            when = rec.get("time") if _numeric(rec.get("time")) else None
            for k, v in rec.items():
                if k not in ("step", "time") and _numeric(v):
                    tb.add_scalar(k, v, step, walltime=when)


def _kept(rec: Any, last_step: float) -> bool:
    step = rec.get("step") if isinstance(rec, dict) else None
    # A window logged partial at a stop goes on in the resumed run, which logs it whole.
    return not _numeric(step) or step < last_step or \
        (step == last_step and "window_partial" not in rec)


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
