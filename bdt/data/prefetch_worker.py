"""The prefetch worker's side (the trainer's: prefetch.py): the loop that builds rows and answers
state requests (`serve`) in a thread or a spawned process (`serve_process`, whose messages the
trainer's `relay` thread receives), a row's tensors as one buffer (`Flat`), and depth 0's rows
built on demand (`OnDemand`).
"""

from __future__ import annotations

import collections
import multiprocessing
import pickle
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from bdt.entry import ignore_stop_signals, setup_logging

if TYPE_CHECKING:  # prefetch.py imports this module
    from bdt.data.prefetch import RowSource, Tensors

POLL_S = 0.2  # how often a waiting side checks that the other one is still alive
_ALIGN = 64  # byte alignment of each tensor inside a row's buffer
WHERE_BYTES = 1024  # a worker process's report of what it reads, in shared memory


@dataclass
class Flat:
    """A row's tensors in one uint8 buffer: (name, dtype, shape, byte offset) per tensor."""

    data: torch.Tensor
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int]]

    @staticmethod
    def of(tensors: Tensors, pin: bool) -> Flat:
        layout, size = [], 0
        for name, t in tensors.items():
            layout.append((name, t.dtype, tuple(t.shape), size))
            size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        data = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        for (_, _, _, offset), t in zip(layout, tensors.values()):
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            data[offset:offset + flat.numel()].copy_(flat)
        return Flat(data, layout)

    def views(self, data: torch.Tensor | None = None) -> Tensors:
        """The row's tensors as views of `data` (the buffer, or a copy of it elsewhere)."""
        data = self.data if data is None else data
        return {name: data[offset:offset + torch.Size(shape).numel() * dtype.itemsize]
                .view(dtype).view(shape) for name, dtype, shape, offset in self.layout}


class OnDemand:
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


def serve(factory: Callable[[], RowSource], depth: int, inbox, out, pin: bool, views: bool,
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
                if inbox.get(timeout=POLL_S)[0] == "stop":
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
            kind, arg = inbox.get(timeout=POLL_S) if waiting >= depth else inbox.get_nowait()
        except queue.Empty:
            if waiting >= depth:
                if not alive():
                    return
                continue
            tensors, extra = source.next_row()
            built += 1
            marks[built] = source.mark()
            flat = Flat.of(tensors, pin)
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


def where_of(source: RowSource) -> str:
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


class PipeEnd:
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


def serve_process(factory: Callable[[], RowSource], depth: int, inbox: PipeEnd,
                  outbox: PipeEnd, where) -> None:
    """A worker process: the trainer handles the stop signals and stops it; bdt's log format
    (which drops what a hung-up terminal refuses); one torch thread (the producer is
    Python-bound, and its cores belong to training). A thread copies what its source reads into
    `where` each second (a stuck read holds no GIL)."""
    ignore_stop_signals()
    setup_logging()  # the source's warnings (a skipped shard) with the rank, as in the trainer
    torch.set_num_threads(1)

    def report(source: RowSource) -> None:
        while True:
            where.value = where_of(source).encode()[:WHERE_BYTES - 1]
            time.sleep(1.0)

    def built(source: RowSource) -> None:
        threading.Thread(target=report, args=(source,), name="bdt-prefetch-where",
                         daemon=True).start()

    try:
        serve(factory, depth, inbox, outbox, False, False,
              multiprocessing.parent_process().is_alive, built)
    except (EOFError, OSError):  # the trainer's ends of the pipes are gone: so is the trainer
        pass


def relay(outbox: PipeEnd, out: queue.Queue, proc, pin: bool, depth: int) -> None:
    """Trainer-side thread of a worker process: receives its messages (a row's buffer arrives
    as one shared-memory handle), pins rows on CUDA, and reports a worker that died silently."""
    recent = _recent(depth)
    while True:
        try:
            kind, payload = outbox.get(timeout=POLL_S)
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
            flat = Flat(flat.data.pin_memory(), flat.layout) if pin else flat
            payload = (flat, flat.views(), extra)
            recent.append(flat)
        out.put((kind, payload))
