"""Rows built ahead of the trainer by a background worker, with exact stream state.

The trainer's data path (read token shards, pack a micro-batch, lay it out as tensors) runs in a
worker -- a thread, or a spawned process (`worker`) -- that keeps up to `depth` rows ready, so a
step only waits for data when the worker falls behind. A row's tensors travel as ONE uint8
buffer (`_Flat`): one shared-memory handle between processes, one pinned host buffer and one
non-blocking host-to-device copy on CUDA, instead of one of each per tensor.

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
ignores SIGINT/SIGTERM (the trainer handles those and stops it) and exits by itself when the
trainer process is gone.

depth = 0 builds each row when asked, nothing ahead: the same rows and states, which is what the
tests compare against. It builds in the caller's thread, or with a stall limit in a thread of
its own that the caller waits for at most `stall_s` (`_OnDemand`): a read that never returns then
raises the same DataStalled.
"""

from __future__ import annotations

import atexit
import collections
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.multiprocessing as torch_mp  # its pickler shares tensors' memory

from bdt.entry import setup_logging

log = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
_POLL_S = 0.2  # how often a waiting side checks that the other one is still alive
_ALIGN = 64  # byte alignment of each tensor inside a row's buffer
_WHERE_BYTES = 1024  # a worker process's report of what it reads, in shared memory


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


@dataclass
class _Flat:
    """A row's tensors in one uint8 buffer: (name, dtype, shape, byte offset) per tensor."""

    data: torch.Tensor
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int]]

    @staticmethod
    def of(tensors: Tensors, pin: bool) -> _Flat:
        layout, size = [], 0
        for name, t in tensors.items():
            layout.append((name, t.dtype, tuple(t.shape), size))
            size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        data = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        for (_, _, _, offset), t in zip(layout, tensors.values()):
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            data[offset:offset + flat.numel()].copy_(flat)
        return _Flat(data, layout)

    def views(self, data: torch.Tensor | None = None) -> Tensors:
        """The row's tensors as views of `data` (the buffer, or a copy of it elsewhere)."""
        data = self.data if data is None else data
        return {name: data[offset:offset + torch.Size(shape).numel() * dtype.itemsize]
                .view(dtype).view(shape) for name, dtype, shape, offset in self.layout}


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
            self._where = lambda: _where(self._source)
            self._on_demand = _OnDemand(self._source) if stall_s else None
            return
        pin = self.device.type == "cuda"
        self._out: queue.Queue = queue.Queue()  # rows, state replies, errors, in order
        if worker == "thread":
            self._inbox = queue.Queue()
            main = threading.main_thread()
            sources: list[RowSource] = []  # the worker's, once built: asked where it reads
            self._started = lambda: bool(sources)
            self._where = lambda: _where(sources[0])
            self._thread = threading.Thread(
                target=_serve, args=(factory, depth, self._inbox, self._out, pin, True,
                                     main.is_alive, sources.append),
                name="bdt-prefetch", daemon=True)
            self._proc = None
        else:
            ctx = torch_mp.get_context("spawn")  # no fork of a process with threads/CUDA
            # Pipes, not multiprocessing queues: a queue's put wakes a feeder thread in the
            # sender, which here is the training loop's process.
            cmd_recv, cmd_send = ctx.Pipe(duplex=False)
            out_recv, out_send = ctx.Pipe(duplex=False)
            self._inbox = _PipeEnd(cmd_send)
            where = ctx.Array("c", _WHERE_BYTES)  # written by a thread of the worker
            self._started = lambda: bool(where.value)
            self._where = lambda: where.value.decode(errors="replace")
            self._proc = ctx.Process(target=_serve_process, name="bdt-prefetch", daemon=True,
                                     args=(factory, depth, _PipeEnd(cmd_recv),
                                           _PipeEnd(out_send), where))
            self._proc.start()
            # Before multiprocessing's exit handler, whose SIGTERM the worker ignores and whose
            # join would then wait forever: an error path that skipped close() still exits.
            atexit.register(self.close)
            cmd_recv.close()  # the worker's ends: only the worker holds them now
            out_send.close()
            self._thread = threading.Thread(target=_relay, name="bdt-prefetch-relay", daemon=True,
                                            args=(_PipeEnd(out_recv), self._out, self._proc, pin,
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
                kind, payload = self._out.get(timeout=_POLL_S)
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


class _OnDemand:
    """A source's rows built in a thread, one when asked (depth 0 with a stall limit): the caller
    waits for it with a timeout, where a read that never returns would hold its own thread."""

    def __init__(self, source: RowSource):
        self._asks: queue.Queue = queue.Queue()
        self._rows: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, args=(source,), name="bdt-prefetch-on-demand",
                         daemon=True).start()

    def _serve(self, source: RowSource) -> None:
        while self._asks.get():
            try:
                self._rows.put((source.next_row(), source.mark()))
            except BaseException as e:  # noqa: BLE001 -- raised in the caller
                self._rows.put(e)

    def next_row(self, timeout: float) -> tuple[tuple[Tensors, Any], Any]:
        """(the next row, the mark after it); queue.Empty after `timeout` s without it."""
        self._asks.put(True)
        got = self._rows.get(timeout=timeout)
        if isinstance(got, BaseException):
            raise got
        return got

    def stop(self) -> None:
        self._asks.put(False)  # a thread stuck in a read sees it once the read returns


# ---- the worker's side --------------------------------------------------------------------
def _serve(factory: Callable[[], RowSource], depth: int, inbox, out, pin: bool, views: bool,
           alive: Callable[[], bool], built: Callable[[RowSource], None]) -> None:
    """Run the worker until "stop" or until `alive()` fails; `built(source)` once the source is.
    After an error it only waits for that: rows it sent before may still be on their way, and a
    process's shared buffers die with it."""
    try:
        _produce(factory, depth, inbox, out, pin, views, alive, built)
    except BaseException as e:  # noqa: BLE001 -- every failure must reach the trainer
        out.put(("error", (_picklable(e), traceback.format_exc())))
        while alive():
            try:
                if inbox.get(timeout=_POLL_S)[0] == "stop":
                    return
            except queue.Empty:
                pass


def _produce(factory: Callable[[], RowSource], depth: int, inbox, out, pin: bool, views: bool,
             alive: Callable[[], bool], built: Callable[[RowSource], None]) -> None:
    """Build rows while credits allow (depth minus unacknowledged rows); answer state
    requests with the state at the asked row's mark."""
    source = factory()
    built(source)
    marks = {0: source.mark()}  # row number -> mark; 0 = before the first row
    built = 0
    recent = _recent(depth)
    while True:
        waiting = built - min(marks)  # rows built and not yet acknowledged
        try:
            kind, arg = inbox.get(timeout=_POLL_S) if waiting >= depth else inbox.get_nowait()
        except queue.Empty:
            if waiting >= depth:
                if not alive():
                    return
                continue
            tensors, extra = source.next_row()
            built += 1
            marks[built] = source.mark()
            flat = _Flat.of(tensors, pin)
            recent.append(flat)
            # In a process the views wait for the relay: sent, each would be a handle of its own.
            out.put(("row", (flat, flat.views() if views else None, extra)))
            continue
        if kind == "stop":
            return
        if kind == "ack":
            for n in [n for n in marks if n < arg]:
                del marks[n]
        elif kind == "state":
            out.put(("state", source.state_at(marks[arg])))


def _recent(depth: int) -> collections.deque:
    """The last rows built (or received), kept here a little longer than the trainer keeps them,
    so that their buffers are freed by this thread: a shared-memory buffer's munmap and close
    took ~0.5 ms of the training thread per row. The trainer holds the row it is on; the
    worker is at most `depth` rows ahead of it."""
    return collections.deque(maxlen=depth + 3)


def _where(source: RowSource) -> str:
    """What the source reads now, in words (its optional `where()`; read from another thread
    while the source runs, so anything it raises means only "unknown")."""
    try:
        return str(source.where()) if hasattr(source, "where") else "in its source"
    except Exception:  # noqa: BLE001
        return "in its source"


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


class _PipeEnd:
    """queue.Queue's get/put over one end of a multiprocessing pipe."""

    def __init__(self, conn):
        self.conn = conn

    def put(self, message) -> None:
        self.conn.send(message)

    def get(self, timeout: float | None = None):
        if not self.conn.poll(timeout):
            raise queue.Empty
        return self.conn.recv()

    def get_nowait(self):
        return self.get(0)


def _serve_process(factory: Callable[[], RowSource], depth: int, inbox: _PipeEnd,
                   outbox: _PipeEnd, where) -> None:
    """A worker process: the trainer handles SIGINT/SIGTERM and stops it; bdt's log format; one
    torch thread (the producer is Python-bound, and its cores belong to training). A thread
    copies what its source reads into `where` each second (a stuck read holds no GIL)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging()  # the source's warnings (a skipped shard) with the rank, as in the trainer
    torch.set_num_threads(1)

    def report(source: RowSource) -> None:
        while True:
            where.value = _where(source).encode()[:_WHERE_BYTES - 1]
            time.sleep(1.0)

    def built(source: RowSource) -> None:
        threading.Thread(target=report, args=(source,), name="bdt-prefetch-where",
                         daemon=True).start()

    try:
        _serve(factory, depth, inbox, outbox, False, False,
               multiprocessing.parent_process().is_alive, built)
    except (EOFError, OSError):  # the trainer's ends of the pipes are gone: so is the trainer
        pass


def _relay(outbox: _PipeEnd, out: queue.Queue, proc, pin: bool, depth: int) -> None:
    """Trainer-side thread of a worker process: receives its messages (a row's buffer arrives
    as one shared-memory handle), pins rows on CUDA, and reports a worker that died silently."""
    recent = _recent(depth)
    while True:
        try:
            kind, payload = outbox.get(timeout=_POLL_S)
        except queue.Empty:
            if proc.is_alive():
                continue
            kind = None
        except (EOFError, OSError):  # its end of the pipe closed: it exited
            kind = None
        if kind is None:
            proc.join(timeout=10)
            if proc.exitcode != 0:  # a clean exit is a stop the trainer asked for
                out.put(("error", (RuntimeError(f"the prefetch worker process died (exit code "
                                                f"{proc.exitcode})"), "")))
            return
        if kind == "row":
            flat, _, extra = payload
            flat = _Flat(flat.data.pin_memory(), flat.layout) if pin else flat
            payload = (flat, flat.views(), extra)
            recent.append(flat)
        out.put((kind, payload))
