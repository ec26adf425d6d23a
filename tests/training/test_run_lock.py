"""The run-directory lock (bdt/training/run_lock.py) and the launcher watch of a rank
(bdt/training/signals.py): a held lock names its holder, stale locks are taken over, a newer lock
is never stolen, a job that lost its lock stops; a rank whose launcher dies is stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from bdt.training import run_lock
from bdt.training.distributed import DistInfo, free_port
from bdt.training.run_lock import (LOCK_NAME, LOST_LOCK_EXIT, RunDirInUse, RunLock, _process_space,
                                   hold_run_lock)
from bdt.training.signals import StoppedBeforeStart
from trainutil import rank_entry, spawn_ranks


def _plant(run_dir, **record):
    """A lock file as another holder left it; returns its path."""
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps({**_process_space(), "pid": 1, "pid_start": 0.0,
                                "token": "other", "started": "earlier", "command": "x", **record}))
    return path


def test_held_lock_names_its_holder_and_is_released(tmp_path):
    first = RunLock(str(tmp_path), heartbeat_s=0.05)
    first.acquire()
    with pytest.raises(RunDirInUse, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(str(tmp_path)).acquire()
    path = tmp_path / LOCK_NAME
    os.utime(path, (0, 0))
    time.sleep(0.3)
    assert time.time() - path.stat().st_mtime < 1  # the heartbeat keeps it fresh
    first.release()
    assert not path.exists()
    second = RunLock(str(tmp_path))
    second.acquire()
    second.release()


def test_stale_locks_are_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(gone.pid).create_time()
    gone.wait()
    _plant(tmp_path, pid=gone.pid, pid_start=started)  # this host, process gone
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert f"its process {gone.pid} is gone" in caplog.text
    lock.release()
    # a reused pid (alive, started at another time) does not keep a lock
    _plant(tmp_path, pid=os.getpid(), pid_start=psutil.Process().create_time() - 100)
    lock = RunLock(str(tmp_path))
    lock.acquire()
    lock.release()
    # another PID namespace on this host (a container sharing its name): the pid says nothing
    gone_elsewhere = {"pid": gone.pid, "pid_start": started, "pid_ns": "pid:[1]"}
    _plant(tmp_path, **gone_elsewhere)
    with pytest.raises(RunDirInUse, match=f"in use by pid {gone.pid} on {socket.gethostname()}"):
        RunLock(str(tmp_path), stale_s=60).acquire()
    # another host: only its heartbeat tells, fresh it holds, expired it does not
    _plant(tmp_path, host="elsewhere", pid=os.getpid())
    with pytest.raises(RunDirInUse, match="in use by pid .* on elsewhere"):
        RunLock(str(tmp_path), stale_s=60).acquire()
    os.utime(tmp_path / LOCK_NAME, (time.time() - 120, time.time() - 120))
    lock = RunLock(str(tmp_path), stale_s=60)
    lock.acquire()
    lock.release()
    assert "no heartbeat for 120 s" in caplog.text


def test_a_takeover_never_steals_a_newer_lock(tmp_path):
    """Two jobs judge the same stale lock; one takes it over first. The other one's rename then
    moves that fresh lock: it must notice, put the lock back and fail."""
    stale = json.loads(_plant(tmp_path, host="elsewhere").read_text())
    winner = RunLock(str(tmp_path))
    os.utime(tmp_path / LOCK_NAME, (0, 0))
    winner.acquire()
    loser = RunLock(str(tmp_path))
    with pytest.raises(RunDirInUse, match=f"in use by pid {os.getpid()}"):
        loser._take_over(stale, "no heartbeat")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == winner.record["token"]
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]
    winner.release()


def test_a_lock_that_no_job_can_hold_is_named(tmp_path):
    """A directory or a symlink to nothing in RUN_LOCK's place: every start failed, once with
    IsADirectoryError, once saying that other jobs kept taking the lock (none did); garbage
    nested past the parser in a lock file raised RecursionError."""
    path = tmp_path / LOCK_NAME
    path.mkdir()
    with pytest.raises(OSError, match=f"run lock {path} is a directory, not a lock file"):
        RunLock(str(tmp_path)).acquire()
    path.rmdir()
    path.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OSError, match=f"run lock {path} is a symlink to nothing"):
        RunLock(str(tmp_path)).acquire()
    path.unlink()
    path.write_text("[" * 100_000)
    os.utime(path, (0, 0))  # no heartbeat for long: an unknown holder's stale lock
    lock = RunLock(str(tmp_path))
    lock.acquire()
    lock.release()


@rank_entry
def _lock_rank(rank, world, port, run_dir, out):
    """Each rank's outcome of taking the lock of `run_dir`; the rank then ends (no collective
    follows: a rank 0 that raised alone would leave the others waiting in one)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from bdt.training.distributed import init_distributed

    dist = init_distributed(use_deepspeed=False)
    try:
        hold_run_lock(run_dir, dist)
        outcome = ["held"]
    except Exception as e:  # noqa: BLE001 - what each rank met is the result
        outcome = [type(e).__name__, str(e)]
    with open(os.path.join(out, f"r{rank}.json"), "w") as f:
        json.dump(outcome, f)


@pytest.mark.slow
@pytest.mark.parametrize("lock", ["held", "a directory"])
def test_every_rank_raises_rank0s_error(tmp_path, lock):
    """A RUN_LOCK that rank 0 could not take for another reason than a holder (a directory)
    raised there alone: the other ranks died in the broadcast with gloo's "Connection closed by
    peer" instead of the error."""
    if lock == "held":
        _plant(tmp_path, host="elsewhere")  # fresh: a live holder elsewhere
    else:
        (tmp_path / LOCK_NAME).mkdir()
    spawn_ranks(_lock_rank, (2, free_port(), str(tmp_path), str(tmp_path)), 2)
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert r0 == r1, (r0, r1)
    assert r0[0] == ("RunDirInUse" if lock == "held" else "OSError")
    assert ("in use by pid 1 on elsewhere" if lock == "held" else "is a directory") in r0[1]


def test_a_stop_signal_while_taking_the_lock_leaves_none(tmp_path, monkeypatch):
    """A SIGTERM before step 1 raises where it lands (signals.StoppedBeforeStart): landing
    after the lock file was made and before it was handed back, it left the lock behind."""
    def interrupted(obj):
        raise StoppedBeforeStart(signal.SIGTERM)

    monkeypatch.setattr(run_lock, "broadcast_object", interrupted)
    with pytest.raises(StoppedBeforeStart):
        hold_run_lock(str(tmp_path), DistInfo(0, 1, 0, torch.device("cpu")))
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.slow
def test_a_job_that_lost_its_lock_stops(tmp_path):
    code = (f"import time; from bdt.training.run_lock import RunLock; "
            f"RunLock({str(tmp_path)!r}, heartbeat_s=0.1).acquire(); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / LOCK_NAME).exists():
            assert holder.poll() is None, holder.stderr.read()
            time.sleep(0.05)
        _plant(tmp_path, host="elsewhere")  # someone took it over (it had stalled)
        assert holder.wait(timeout=30) == LOST_LOCK_EXIT
        assert "lost its run lock" in holder.stderr.read()
    finally:
        if holder.poll() is None:
            holder.kill()


@pytest.mark.slow
def test_a_failed_heartbeat_is_retried_and_a_lasting_failure_stops_the_job(tmp_path):
    """One failed refresh (an NFS hiccup) once ended the heartbeat thread for good: the job
    trained on unlocked and a second job could take the run over."""
    code = (f"import time; from bdt.training.run_lock import RunLock; "
            f"RunLock({str(tmp_path)!r}, heartbeat_s=0.05, stale_s=1.5).acquire(); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    lock, aside = tmp_path / LOCK_NAME, tmp_path / "aside"

    def break_lock():
        # Swapped in by one rename, so no heartbeat ever finds the path missing (which would
        # read as a lost lock, not a failed read): a symlink to nothing fails every read.
        dangling = tmp_path / "dangling"
        dangling.symlink_to(tmp_path / "nothing")
        os.rename(dangling, lock)

    try:
        while not lock.exists():
            assert holder.poll() is None, holder.stderr.read()
            time.sleep(0.05)
        os.link(lock, aside)
        break_lock()  # reads fail for a few beats
        time.sleep(0.4)
        os.rename(aside, lock)
        time.sleep(0.4)
        assert holder.poll() is None  # retried: still running, still beating
        beat = lock.stat().st_mtime
        time.sleep(0.3)
        assert lock.stat().st_mtime > beat
        break_lock()  # for good: it must stop before it could look stale
        assert holder.wait(timeout=30) == LOST_LOCK_EXIT
        assert "heartbeat failed" in holder.stderr.read()
    finally:
        if holder.poll() is None:
            holder.kill()


@pytest.mark.slow
def test_a_rank_whose_launcher_dies_is_stopped(tmp_path):
    """Once its launcher is gone the rank's stop flag says stop (the loop would save and exit);
    a rank that still runs when the grace time is over is killed."""
    rank = (f"import time, pathlib, torch; from bdt.training import distributed, signals; "
            f"flag = signals.StopFlag(); distributed.watch_launcher(grace_s=2, poll_s=0.1); "
            f"pathlib.Path({str(tmp_path / 'ready')!r}).write_text('x')\n"
            f"while flag.should_stop(torch.device('cpu')) != signals.STOP_SIGNAL: time.sleep(0.05)\n"
            f"pathlib.Path({str(tmp_path / 'stop')!r}).write_text('x'); time.sleep(120)")
    launcher = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                f"{rank!r}]); print(p.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        while not (tmp_path / "ready").exists():
            assert child.is_running()
            time.sleep(0.05)
        assert not (tmp_path / "stop").exists()
        parent.kill()
        parent.wait()
        assert not psutil.wait_procs([child], timeout=60)[1]
        assert (tmp_path / "stop").exists()
    finally:
        if child.is_running():
            child.kill()
