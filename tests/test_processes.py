"""bdt.processes.running: the one liveness check of a recorded process (pid + start time) that
the run lock, the extraction lock and the remote-shard spool sweep share."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time

import psutil

from bdt.data import shard_writer
from bdt.processes import host_tag, running, writer_tag
from bdt.training.run_lock import holder_alive


@contextlib.contextmanager
def zombie():
    """(pid, start time) of a child that has exited but is not reaped yet."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        started = psutil.Process(child.pid).create_time()
        deadline = time.monotonic() + 30
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        yield child.pid, started
    finally:
        child.wait()


def test_a_live_process_runs_and_a_reused_pid_or_bad_record_does_not():
    me = psutil.Process()
    assert running(me.pid, me.create_time())
    assert running(str(me.pid), round(me.create_time() * 1000) / 1000)  # a record in ms
    assert not running(me.pid, me.create_time() - 100)  # the pid, now another process's
    for pid, started in [(None, 0.0), ("x", 0.0), (-1, 0.0), (2**70, 0.0), (me.pid, None),
                         (me.pid, "soon"), (me.pid, float("nan"))]:
        assert not running(pid, started)


def test_a_zombie_is_gone_for_every_user():
    with zombie() as (pid, started):
        assert psutil.pid_exists(pid)
        assert not running(pid, started)
        assert not holder_alive({"pid": pid, "pid_start": started})


def test_the_spool_sweep_deletes_a_zombie_writers_spool(tmp_path, monkeypatch):
    """A writer that exited and was not reaped yet (its parent still running) holds nothing:
    its spool goes; this process's (alive) stays."""
    mine = f"bdt-shard-{writer_tag()}-a.part"
    (tmp_path / mine).write_bytes(b"")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with zombie() as (pid, started):
        dead = f"bdt-shard-{pid}-{round(started * 1000)}-{host_tag()}-b.part"
        (tmp_path / dead).write_bytes(b"")
        monkeypatch.setattr(shard_writer, "_swept_spools", False)
        shard_writer._spool_prefix()
        assert sorted(os.listdir(tmp_path)) == [mine]
