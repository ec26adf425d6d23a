"""One job per run directory: a lock file naming its holder, kept alive by a heartbeat (system §2).

`<run_dir>/RUN_LOCK` holds JSON: host, pid, the pid's start time, a random token, start time and
command. It appears atomically with its content (`storage.create_exclusive`: written to a temporary
file, then hard-linked to its name; the link fails when the lock exists, on local filesystems
and NFS alike). Global rank 0 holds it for the whole job, refreshes its mtime every
`heartbeat_s` from a daemon thread, and removes it at the end. A second job finds it and fails
at once, naming the holder.

A lock is stale when its holder is gone: in this process space (same host, boot and PID
namespace: a container sharing the host's name but not its pids must not judge by pid), no
process with that pid and start time (a reused pid does not count); anywhere, no heartbeat for
`stale_s` (the hosts' clocks are assumed to agree to well under that). Taking over renames the
stale file away, which only one contender can do, and checks that the file it moved is the one
it judged stale (else that was a newer lock: it is put back). The heartbeat checks the token, so
a job whose lock was taken over while it stalled stops instead of writing beside the new holder;
a failed refresh (NFS: ESTALE, EIO) is retried, and a job that cannot refresh its lock for so
long that it could look stale stops too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import psutil

from bdt import storage
from bdt.processes import running
from bdt.training.distributed import DistInfo, broadcast_object

log = logging.getLogger(__name__)

LOCK_NAME = "RUN_LOCK"
HEARTBEAT_S = 10.0
STALE_S = 60.0
LOST_LOCK_EXIT = 75  # EX_TEMPFAIL: the job can be run again once the other one is done


class RunDirInUse(OSError):
    """Another job holds the run directory; the message names it."""


class RunLock:
    def __init__(self, run_dir: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK_NAME)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        me = psutil.Process()
        self.record = {**_process_space(), "pid": me.pid, "pid_start": me.create_time(),
                       "token": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "command": " ".join(sys.argv)[:300], "slurm_job": os.environ.get("SLURM_JOB_ID")}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock (or a stale one over); RunDirInUse naming the holder if it is held."""
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(5):  # only a lost takeover race loops
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="bdt-run-lock", daemon=True)
                self._thread.start()
                return
            holder, age = self._read()
            if holder is None:
                continue  # released meanwhile
            why = self._stale_because(holder, age)
            if why is None:
                raise RunDirInUse(self._in_use(holder, age))
            self._take_over(holder, why)
        raise RunDirInUse(f"run directory {self.run_dir}: could not take {LOCK_NAME} (other jobs "
                          f"keep taking it): is another job starting on this run?")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.record["token"]:
            os.unlink(self.path)

    # ---- internals ---------------------------------------------------------------------------
    def _create(self) -> bool:
        return storage.create_exclusive(self.path, json.dumps(self.record).encode())

    def _read(self) -> tuple[dict | None, float]:
        return _read_lock(self.path)

    def _stale_because(self, holder: dict, age: float) -> str | None:
        here = all(holder.get(k) == self.record.get(k) for k in SPACE_KEYS)
        if here and not holder_alive(holder):
            return f"its process {holder.get('pid')} is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def _take_over(self, holder: dict, why: str) -> None:
        moved = f"{self.path}.stale-{self.record['token']}"
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another contender moved it first
        got = _read_lock(moved)[0] or {}
        if got.get("token") != holder.get("token"):  # a newer lock, taken after our look
            try:
                os.link(moved, self.path)
            finally:
                os.unlink(moved)
            raise RunDirInUse(self._in_use(got, 0.0))
        os.unlink(moved)
        log.warning("run lock %s: took over the stale lock of %s (%s)", self.path,
                    _describe(holder), why)

    def _in_use(self, holder: dict, age: float) -> str:
        return (f"run directory {self.run_dir} is in use by {_describe(holder)}, heartbeat "
                f"{age:.0f} s ago (lock file {self.path}). Let that job finish or stop it; its "
                f"lock is taken over once its process is gone or after {self.stale_s:.0f} s "
                f"without a heartbeat")

    def _beat(self) -> None:
        refreshed = time.monotonic()
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder, _ = self._read()
                if holder is not None and holder.get("token") == self.record["token"]:
                    os.utime(self.path)
                    refreshed = time.monotonic()
                    continue
            except OSError as e:  # a shared filesystem's hiccup: try again next beat
                silent = time.monotonic() - refreshed
                if silent + self.heartbeat_s < self.stale_s:
                    log.warning("run lock %s: heartbeat failed (%s); retrying", self.path, e)
                    continue
                log.error("run lock %s: no heartbeat for %.0f s (%s): another job may take the "
                          "run over now, so this one stops", self.path, silent, e)
                os._exit(LOST_LOCK_EXIT)
            who = "nobody (the lock file was removed)" if holder is None else _describe(holder)
            log.error("this job lost its run lock %s, now held by %s: stopping so that two "
                      "jobs never write into one run", self.path, who)
            os._exit(LOST_LOCK_EXIT)


def hold_run_lock(run_dir: str, dist: DistInfo) -> RunLock | None:
    """Collective: global rank 0 takes the run directory's lock (returned there; None elsewhere);
    every rank raises the same RunDirInUse when another job holds it, and the same OSError when
    rank 0 cannot take it (other ranks would otherwise die in the broadcast, with gloo's error)."""
    lock, error = None, None
    try:
        if dist.is_main:
            lock = RunLock(run_dir)
            try:
                lock.acquire()
            except OSError as e:
                lock, error = None, (isinstance(e, RunDirInUse), str(e))
        error = broadcast_object(error)
    except BaseException:  # a stop signal in start-up (signals.py): leave no lock behind
        if lock is not None:
            lock.release()
        raise
    if error:
        in_use, message = error
        raise (RunDirInUse if in_use else OSError)(message)
    return lock


def holder_alive(holder: dict) -> bool:
    """Whether the holder's process (`pid` and its start time `pid_start`) still runs on this
    host (a zombie does not)."""
    return running(holder.get("pid"), holder.get("pid_start"))


SPACE_KEYS = ("host", "boot_id", "pid_ns")  # what _process_space records


def _process_space() -> dict:
    """Where a pid names a process: the host, its boot and the PID namespace (None where the
    system does not say)."""
    def first_line(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.readline().strip() or None
        except OSError:
            return None

    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"host": socket.gethostname(), "boot_id": first_line("/proc/sys/kernel/random/boot_id"),
            "pid_ns": pid_ns}


def _read_lock(path: str) -> tuple[dict | None, float]:
    """(the lock's record, seconds since its heartbeat); (None, 0) when there is none. An
    unreadable lock reads as {} (an unknown holder: stale only by its heartbeat)."""
    try:
        with open(path) as f:
            age = time.time() - os.fstat(f.fileno()).st_mtime
            try:
                record = json.load(f)
            except (ValueError, RecursionError):  # RecursionError: nested past the parser
                record = {}
    except (FileNotFoundError, IsADirectoryError) as e:
        # A symlink to nothing or a directory is no job's lock, and no job could ever create
        # the lock over it: each start would wait for a holder that does not exist.
        if isinstance(e, IsADirectoryError) or os.path.islink(path):
            kind = "a directory" if isinstance(e, IsADirectoryError) else "a symlink to nothing"
            raise OSError(f"run lock {path} is {kind}, not a lock file: remove it (no job "
                          f"holds the run directory through it)") from None
        return None, 0.0
    return (record if isinstance(record, dict) else {}), age


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown holder (unreadable lock file)"
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (f"pid {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')}"
            f"{job}; command: {holder.get('command')})")
