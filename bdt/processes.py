"""Whether a process that some record names (a lock holder, a spool's writer) still runs on this
host: its pid alone is not enough, since the OS reuses pids, so the record also keeps the
process's start time (psutil's `create_time`, seconds since the epoch)."""

from __future__ import annotations

import hashlib
import os
import socket

import psutil

START_TOLERANCE_S = 1e-3  # records may keep the start time in milliseconds


def running(pid: object, started: object) -> bool:
    """Whether process `pid`, started at `started`, still runs here. A pid now held by another
    process (another start time) or a zombie (exited, not yet reaped: it holds nothing and
    writes nothing) counts as gone, and so does a record whose values are not numbers."""
    try:
        proc = psutil.Process(int(pid))
        return (abs(proc.create_time() - float(started)) < START_TOLERANCE_S
                and proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, TypeError, ValueError, OverflowError):
        return False


# How files name the process that writes them (temp files, spools), so that a killed writer's
# leftovers can be told from a live writer's: PID-STARTMS-HOST, HOST the first 8 hex digits of
# the host name's sha256 (short, and safe in a file name).
WRITER_TAG_PATTERN = r"(?P<pid>\d+)-(?P<started_ms>\d+)-(?P<host>[0-9a-f]{8})"


def host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def writer_tag() -> str:
    """This process, as WRITER_TAG_PATTERN reads it."""
    me = psutil.Process()
    return f"{me.pid}-{round(me.create_time() * 1000)}-{host_tag()}"


def writer_gone(pid: str, started_ms: str, host: str) -> bool:
    """Whether the writer a tag names ran on this host and has ended (another host's writer is
    not known to be gone: this host cannot see its processes)."""
    return host == host_tag() and not running(int(pid), int(started_ms) / 1000)


def exit_with_parent() -> None:
    """In a pool worker (an initializer): exit as soon as the process that started it does. A
    parent killed by a signal never shuts its pool down, and the workers would wait for tasks
    on its queue forever."""
    import multiprocessing
    import threading

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # waits on the parent's sentinel: returns when it has exited
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
