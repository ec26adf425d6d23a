"""Rows built ahead of the trainer by a background worker, with exact stream state.

The trainer's data path (read token shards, pack a micro-batch, lay it out as tensors) runs in a
worker -- a thread, or a spawned process (`worker`) -- that keeps up to `depth` rows ready, so a
step only waits for data when the worker falls behind (the worker's side: prefetch_worker.py).
A row's tensors travel as ONE uint8 buffer (`Flat`): one shared-memory handle between processes,
one pinned host buffer and one non-blocking host-to-device copy on CUDA, instead of one of each
per tensor.

Exact resume: the worker's source is always ahead of the trainer by the rows in flight, so its
state now is NOT the state to save. After building a row the worker takes a cheap `mark()` of
its source (e.g. TokenStream.mark: the position, RNG and the buffer as references); the trainer
acknowledges each row it takes, and `state_dict()` asks for the state at the mark of the last
row taken. A resume from that state builds the rows that were prefetched but never consumed
again, identically. Marks of acknowledged rows are dropped, so at most depth + 1 are held.

A worker that builds no row for `stall_s` seconds once its source is built (a read that never
returns: a hung mount, a storage endpoint that stopped answering) is stopped and DataStalled
raised, naming what its source was reading (`where()`): the run ends with that, not with a
collective's timeout on the other ranks, and the launcher or the resume wrapper starts it again
from its checkpoint.

The worker is stopped (and joined) by `close()`, at a stage switch, at the end of training and
on every error path; an exception in the worker is raised in the trainer as it was (type and
message), caused by a WorkerTraceback that holds the worker's traceback. A worker process
ignores the stop signals (the trainer handles those and stops it) and exits by itself when
the trainer process is gone.

depth = 0 builds each row when asked, nothing ahead: the same rows and states, which is what the
tests compare against. It builds in the caller's thread, or with a stall limit in a thread of
its own that the caller waits for at most `stall_s` (`OnDemand`): a read that never returns then
raises the same DataStalled.
"""

from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.multiprocessing as torch_mp  # its pickler shares tensors' memory

from bdt.data.prefetch_worker import (POLL_S, WHERE_BYTES, OnDemand, PipeEnd, relay, serve,
                                      serve_process, where_of)

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


class WorkerTraceback(Exception):
    """The cause attached to an error re-raised from the worker: its traceback there, as text."""


class DataStalled(TimeoutError):
    """The worker built no row within the limit (its message says what it was reading)."""


class RowSource(Protocol):
    """What the worker drives; built by the (picklable) factory inside the worker."""

    def next_row(self) -> tuple[Tensors, Any]:
        """The next row: its tensors and any small picklable extra (keys, counts)."""

    def mark(self) -> Any:
        """The source's position right after the last row (cheap; held until acknowledged)."""

    def state_at(self, mark: Any) -> tuple[dict, Tensors]:
        """The checkpointable state at a mark: (JSON-able dict, tensors)."""

    # Optional: `where() -> str`, what it reads now ("reading URL from byte N"), asked from
    # another thread when the worker stalls.


class Prefetcher:
    """Rows of `factory()`'s RowSource, built ahead by a `worker` ("thread" or "process"), their
    tensors on `device` except those named in `host_keys` (read on the host by the consumer)."""

    def __init__(self, factory: Callable[[], RowSource], depth: int, worker: str = "thread",
                 device: torch.device | str = "cpu", host_keys: frozenset[str] = frozenset(),
                 stall_s: float = 0.0):
        if depth < 0 or worker not in ("thread", "process") or not stall_s >= 0:
            raise ValueError(f"prefetch depth must be >= 0, the worker 'thread' or 'process' and "
                             f"the stall limit >= 0 s, got {depth}, {worker!r} and {stall_s}")
        self.depth, self.device, self.host_keys = depth, torch.device(device), host_keys
        self.stall_s = stall_s  # 0 = wait for a row as long as it takes
        self._taken = 0  # rows handed out
        self._closed = False
        self._early: collections.deque = collections.deque()  # rows that came with a reply
        if depth == 0:
            self._source = factory()
            self._mark = self._source.mark()
            self._where = lambda: where_of(self._source)
            self._on_demand = OnDemand(self._source) if stall_s else None
            return
        pin = self.device.type == "cuda"
        self._out: queue.Queue = queue.Queue()  # rows, state replies, errors, in order
        if worker == "thread":
            self._inbox = queue.Queue()
            main = threading.main_thread()
            sources: list[RowSource] = []  # the worker's, once built: asked where it reads
            self._started = lambda: bool(sources)
            self._where = lambda: where_of(sources[0])
            self._thread = threading.Thread(
                target=serve, args=(factory, depth, self._inbox, self._out, pin, True,
                                    main.is_alive, sources.append),
                name="bdt-prefetch", daemon=True)
            self._proc = None
        else:
            ctx = torch_mp.get_context("spawn")  # no fork of a process with threads/CUDA
            # Pipes, not multiprocessing queues: a queue's put wakes a feeder thread in the
            # sender, which here is the training loop's process.
            cmd_recv, cmd_send = ctx.Pipe(duplex=False)
            out_recv, out_send = ctx.Pipe(duplex=False)
            self._inbox = PipeEnd(cmd_send)
            where = ctx.Array("c", WHERE_BYTES)  # written by a thread of the worker
            self._started = lambda: bool(where.value)
            self._where = lambda: where.value.decode(errors="replace")
            self._proc = ctx.Process(target=serve_process, name="bdt-prefetch", daemon=True,
                                     args=(factory, depth, PipeEnd(cmd_recv), PipeEnd(out_send),
                                           where))
            self._proc.start()
            # Before multiprocessing's exit handler, whose SIGTERM the worker ignores and whose
            # join would then wait forever: an error path that skipped close() still exits.
            atexit.register(self.close)
            cmd_recv.close()  # the worker's ends: only the worker holds them now
            out_send.close()
            self._thread = threading.Thread(target=relay, name="bdt-prefetch-relay", daemon=True,
                                            args=(PipeEnd(out_recv), self._out, self._proc, pin,
                                                  depth))
        self._thread.start()

    # ---- the trainer's side ----------------------------------------------------------------
    def next(self) -> tuple[Tensors, Any]:
        """The next row (tensors on `device`, copies issued non-blocking) and its extra."""
        self._check_open()
        if self.depth == 0:
            tensors, extra = self._build()
            return {k: v if k in self.host_keys else v.to(self.device)
                    for k, v in tensors.items()}, extra
        # The host views were made on the worker's side (thread or relay), off this thread.
        flat, host, extra = self._early.popleft() if self._early else self._receive("row")
        self._taken += 1
        self._send(("ack", self._taken))
        if self.device.type == "cpu":
            return host, extra
        moved = flat.views(flat.data.to(self.device, non_blocking=True))  # one copy
        return {k: v if k in self.host_keys else moved[k] for k, v in host.items()}, extra

    @property
    def ready(self) -> int:
        """Rows built and arrived here, not yet taken (how far ahead the worker is now)."""
        return 0 if self.depth == 0 else self._out.qsize() + len(self._early)

    def state_dict(self) -> tuple[dict, Tensors]:
        """The source's state right after the last row `next()` returned."""
        self._check_open()
        if self.depth == 0:
            return self._source.state_at(self._mark)
        self._send(("state", self._taken))
        return self._receive("state")

    def close(self, wait_s: float = 30.0) -> None:
        """Stop the worker and wait for it, `wait_s` at most (idempotent); rows still in flight
        are dropped."""
        if self._closed:
            return
        self._closed = True
        if self.depth == 0:
            if self._on_demand is not None:
                self._on_demand.stop()
            return
        try:
            self._inbox.put(("stop", None))
        except OSError:  # a worker process that is already gone
            pass
        if self._proc is not None:
            atexit.unregister(self.close)
            self._proc.join(timeout=wait_s)
            if self._proc.is_alive():  # stuck in a read: it holds nothing worth waiting for
                self._proc.kill()
                self._proc.join()
            self._inbox.conn.close()
        self._thread.join(timeout=wait_s)
        if self._thread.is_alive() and wait_s:  # a daemon: it cannot keep the process from exiting
            log.warning("the prefetch thread %s did not stop within %.0f s (stuck in a read?)",
                        self._thread.name, wait_s)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> tuple[Tensors, Any]:
        """The next row at depth 0 (its mark taken)."""
        if self._on_demand is None:
            row = self._source.next_row()
            self._mark = self._source.mark()
            return row
        try:
            row, self._mark = self._on_demand.next_row(self.stall_s)
        except queue.Empty:
            self._stalled()
        return row

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the prefetcher is closed")

    def _send(self, message: tuple) -> None:
        try:
            self._inbox.put(message)
        except OSError:  # a worker process that died (say, the OOM killer): not a bare EPIPE
            self._receive("error")  # raises its relay's report of how it ended

    def _receive(self, want: str) -> Any:
        since = time.monotonic()
        while True:
            try:
                kind, payload = self._out.get(timeout=POLL_S)
            except queue.Empty:
                if not self._started():  # a worker process still importing is no stalled read
                    since = time.monotonic()
                elif self.stall_s and time.monotonic() - since > self.stall_s:
                    self._stalled()
                if self._thread.is_alive():
                    continue
                self.close()
                raise RuntimeError("the prefetch worker stopped without an answer") from None
            if kind == "error":
                error, worker_traceback = payload
                self.close()
                raise error from WorkerTraceback(worker_traceback)
            if kind == want:
                return payload
            self._early.append(payload)  # a row that was on its way before a state reply

    def _stalled(self) -> None:
        where = self._where()  # before close(): a process's report dies with it
        self.close(wait_s=0)  # it is stuck: a process is killed, a thread left (a daemon)
        raise DataStalled(f"the prefetch worker built no row for {self.stall_s:.0f} s; it is "
                          f"{where}: a read that does not return (a hung mount, a storage "
                          f"endpoint that stopped answering)? Stopping: a resume continues from "
                          f"the last checkpoint (data.stall_s sets the limit, 0 = no limit)")
