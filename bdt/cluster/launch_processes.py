"""The processes of one launch of bdt.cluster.resume: its local training ranks, and the SIGTERM
the launch gets when the wrapper dies.

    python -m bdt.cluster.launch_processes stop PID   # SIGTERM to the training ranks under PID
"""

from __future__ import annotations

import os
import signal
import sys
import time


def rank_processes(root_pid: int) -> list:
    """Training ranks started on this machine under `root_pid` (launchers set RANK for them)."""
    import psutil

    ranks = []
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    for proc in children:
        try:
            if "RANK" in proc.environ() and "LOCAL_RANK" in proc.environ():
                ranks.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return ranks


def term_when_parent_dies(wrapper_pid: int) -> None:
    """In the launch's process, before exec: SIGTERM when the wrapper (`wrapper_pid`) dies
    (Linux only), also when it died between the fork and this call, which no death signal
    reports: the launch ran on after a wrapper killed as it started it."""
    if sys.platform.startswith("linux"):
        import ctypes

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the wrapper's handler took it until exec
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != wrapper_pid:
            os.kill(os.getpid(), signal.SIGTERM)


def stop_ranks(root_pid: int, wait_s: float = 120.0) -> int:
    """SIGTERM to the ranks under `root_pid`, waiting up to `wait_s` for a launch still starting
    them; how many were signalled."""
    import psutil

    end = time.monotonic() + wait_s
    while not (ranks := rank_processes(root_pid)) and time.monotonic() < end:
        if not psutil.pid_exists(root_pid):
            return 0
        time.sleep(0.5)
    for proc in ranks:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:  # it already exited
            pass
    return len(ranks)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "stop" or not sys.argv[2].isdigit():
        sys.exit("usage: python -m bdt.cluster.launch_processes stop PID")
    sys.exit(0 if stop_ranks(int(sys.argv[2])) else 1)
