"""Whether a process that some record names (a lock holder, a spool's writer) still runs on this
host: its pid alone is not enough, since the OS reuses pids, so the record also keeps the
process's start time (psutil's `create_time`, seconds since the epoch)."""

from __future__ import annotations

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
