"""The prefetch worker (thread and process): the rows and states of building inline, the state
of the last row TAKEN while the worker is ahead, errors raised in the caller with their message,
and no thread or process left behind (close, SIGTERM, a trainer that dies)."""

import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from bdt.data.prefetch import Prefetcher, WorkerTraceback

WORKERS = ["thread", pytest.param("process", marks=pytest.mark.slow)]


class Counting:
    """A RowSource whose row n holds tensors of three dtypes made from n; its state is n."""

    def __init__(self, start: int, fail_at: int | None):
        if start < 0:
            raise ValueError(f"cannot start at row {start} (test)")
        self.n, self.fail_at = start, fail_at

    def next_row(self):
        if self.n == self.fail_at:
            raise ValueError(f"row {self.n} is corrupt (test)")
        self.n += 1
        n = self.n
        return {"ids": torch.arange(n, n + 3), "mask": torch.tensor([n % 2 == 0, True]),
                "bits": torch.full((2, n), float(n)), "empty": torch.zeros(0, 4)}, {"n": n}

    def mark(self):
        return self.n

    def state_at(self, mark):
        return {"n": mark}, {"n": torch.tensor([mark])}


@dataclass
class CountingRows:
    """Picklable factory (a worker process builds the source from it)."""

    start: int = 0
    fail_at: int | None = None

    def __call__(self) -> Counting:
        return Counting(self.start, self.fail_at)



@dataclass
class WarningRows(CountingRows):
    """Rows whose source warns about each one, as TokenStream does about a skipped shard."""

    def __call__(self) -> Counting:
        source = super().__call__()
        next_row = source.next_row

        def warned():
            logging.getLogger("bdt.data.test").warning("skipping shard %d (test)", source.n)
            return next_row()

        source.next_row = warned
        return source

@dataclass
class StuckRows(CountingRows):
    """Rows whose read of row `stuck_at` does not return until the file `release` exists (a
    hung mount); the source says what it reads."""

    stuck_at: int = 0
    release: str = ""

    def __call__(self) -> Counting:
        source = super().__call__()
        next_row = source.next_row

        def hangs():
            while source.n == self.stuck_at and not os.path.exists(self.release):
                time.sleep(0.05)
            return next_row()

        source.next_row = hangs
        source.where = lambda: f"reading shard-{source.n}.tar from byte {512 * source.n}"
        return source


def no_workers_left():
    names = [t.name for t in threading.enumerate() if t.name.startswith("bdt-prefetch")]
    return not names and not multiprocessing.active_children()


def wait_ready(p: Prefetcher, n: int) -> None:
    deadline = time.monotonic() + 60
    while p.ready < n:
        assert time.monotonic() < deadline, "the worker built nothing ahead"
        time.sleep(0.01)


@pytest.mark.parametrize("worker", WORKERS)
def test_rows_and_state_of_the_last_row_taken(worker):
    with Prefetcher(CountingRows(), 0) as inline:
        want = [inline.next() for _ in range(8)]
        assert inline.state_dict()[0] == {"n": 8}
    with Prefetcher(CountingRows(), 3, worker) as p:
        got = [p.next() for _ in range(2)]
        wait_ready(p, 3)  # the worker's source is at row 5 now
        assert not no_workers_left()  # the check below sees a live worker by its name
        meta, tensors = p.state_dict()
        assert meta == {"n": 2} and tensors["n"].tolist() == [2]
        assert p.ready == 3  # rows that came in while the state was asked are kept, in order
        got += [p.next() for _ in range(6)]
        assert p.state_dict()[0] == {"n": 8}
    for (a, extra_a), (b, extra_b) in zip(want, got):
        assert extra_a == extra_b and a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert no_workers_left()


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_errors_surface_with_their_message(worker):
    p = Prefetcher(CountingRows(fail_at=2), 2, worker)
    assert [p.next()[1]["n"] for _ in range(2)] == [1, 2]
    with pytest.raises(ValueError, match=r"row 2 is corrupt \(test\)") as info:
        p.next()
    assert isinstance(info.value.__cause__, WorkerTraceback)
    assert "next_row" in str(info.value.__cause__)  # where it happened, in the worker
    p.close()
    with Prefetcher(CountingRows(start=-1), 2, worker) as p:  # failing to open the source
        with pytest.raises(ValueError, match="cannot start at row -1"):
            p.next()
    assert no_workers_left()


@pytest.mark.parametrize("worker", WORKERS)
def test_close_with_rows_in_flight(worker):
    p = Prefetcher(CountingRows(), 4, worker)
    p.next()
    wait_ready(p, 2)
    p.close()
    p.close()
    assert no_workers_left()
    with pytest.raises(RuntimeError, match="closed"):
        p.next()


@pytest.mark.parametrize("depth,worker", [(2, "thread"), pytest.param(2, "process",
                                                                      marks=pytest.mark.slow),
                                          (0, "thread")])
def test_a_worker_stuck_in_a_read_stops_the_caller_naming_what_it_reads(depth, worker, tmp_path):
    """Before: next() waited forever on a read that did not return (the other ranks then timed
    out in a collective, saying nothing of the data), at depth 0 (rows built when asked) even
    with the limit."""
    release = str(tmp_path / "release")
    p = Prefetcher(StuckRows(stuck_at=3, release=release), depth, worker, stall_s=1.5)
    # a worker process takes longer than that to start (imports): that is no stall
    assert [p.next()[1]["n"] for _ in range(3)] == [1, 2, 3]
    waited = time.monotonic()
    late = threading.Timer(20, lambda: open(release, "w").close())  # returns late: no hang
    late.start()
    with pytest.raises(TimeoutError, match=r"the prefetch worker built no row for 2 s; it is "
                                           r"reading shard-3.tar from byte 1536: a read that "
                                           r"does not return .*data.stall_s"):
        p.next()
    late.cancel()
    assert 1.5 <= time.monotonic() - waited < 10
    with pytest.raises(RuntimeError, match="closed"):
        p.next()
    open(release, "w").close()  # the hung read returns: a thread worker then sees the stop
    deadline = time.monotonic() + 30
    while not no_workers_left():
        assert time.monotonic() < deadline, "the stuck worker was left running"
        time.sleep(0.05)


@pytest.mark.slow
def test_worker_process_ignores_sigterm():
    """A launcher's SIGTERM reaches the whole process group; the trainer catches it and saves at
    the next step boundary, which needs the worker's state: the worker must live on."""
    with Prefetcher(CountingRows(), 2, "process") as p:
        p.next()
        os.kill(p._proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert [p.next()[1]["n"] for _ in range(3)] == [2, 3, 4]
        assert p.state_dict()[0] == {"n": 4}
    assert no_workers_left()



@pytest.mark.slow
@pytest.mark.parametrize("ask", ["next", "state_dict"])
def test_a_killed_worker_process_is_named(ask):
    """A worker process killed with rows in flight (the OOM killer): the trainer's next call
    says the worker died and how, not a bare broken pipe (which bdt/train.py prints alone)."""
    p = Prefetcher(CountingRows(), 3, "process")
    p.next()
    wait_ready(p, 3)
    # Not joined here: the relay thread reaps it, and a second thread's waitpid racing with it
    # could leave the exit code it reads unset.
    os.kill(p._proc.pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"prefetch worker process died \(exit code -9\)"):
        for _ in range(5):
            getattr(p, ask)()
    assert no_workers_left()


@pytest.mark.slow
def test_worker_process_logs_in_bdts_format(capfd):
    """Its warnings name the rank (a multi-rank log must say whose data was skipped)."""
    with Prefetcher(WarningRows(), 1, "process") as p:
        p.next()
    assert re.search(r"rank \d+ WARNING bdt.data.test: skipping shard 0 \(test\)",
                     capfd.readouterr().err)

TRAINER = """
import os, sys, time
sys.path[:0] = {path!r}
from bdt.data.prefetch import Prefetcher
from test_prefetch import CountingRows
if __name__ == "__main__":
    p = Prefetcher(CountingRows(), 2, "process")
    p.next()
    print(p._proc.pid, flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_worker_process_exits_when_the_trainer_is_killed(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER.format(path=[os.path.dirname(__file__), os.getcwd()]))
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pid = int(trainer.stdout.readline())
    trainer.kill()
    trainer.wait()
    deadline = time.monotonic() + 30
    while _running(pid):
        assert time.monotonic() < deadline, f"worker {pid} outlived its trainer"
        time.sleep(0.1)



UNCLOSED = """
import sys
sys.path[:0] = {path!r}
from bdt.data.prefetch import Prefetcher
from test_prefetch import CountingRows
if __name__ == "__main__":
    p = Prefetcher(CountingRows(), 2, "process")  # held: a dropped one closes its pipes
    p.next()
    raise SystemExit("failed before close() (test)")
"""


@pytest.mark.slow
def test_a_trainer_that_never_closed_its_worker_process_exits(tmp_path):
    """multiprocessing's exit handler SIGTERMs a daemon child, then joins it: a worker that
    ignores SIGTERM and waits for its trainer to be gone would keep both alive forever."""
    script = tmp_path / "trainer.py"
    script.write_text(UNCLOSED.format(path=[os.path.dirname(__file__), os.getcwd()]))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "failed before close() (test)" in done.stderr

def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("worker", WORKERS)
def test_rows_on_cuda_from_pinned_memory(worker):
    """On CUDA a row arrives pinned and is copied to the device in one non-blocking copy; the
    host_keys tensors stay in the pinned host buffer."""
    with Prefetcher(CountingRows(), 0) as inline:
        want = [inline.next()[0] for _ in range(3)]
    with Prefetcher(CountingRows(), 2, worker, "cuda", host_keys=frozenset({"mask"})) as p:
        got = [p.next()[0] for _ in range(3)]
    for a, b in zip(want, got):
        assert b["ids"].is_cuda and b["bits"].is_cuda
        assert not b["mask"].is_cuda and b["mask"].is_pinned()
        for k in a:
            assert torch.equal(a[k], b[k].cpu()), k
