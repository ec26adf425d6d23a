"""The processes of one launch of bdt.cluster.resume: its local training ranks, and the SIGTERM
the launch gets when the wrapper dies."""

from __future__ import annotations

import os
import signal
import sys


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
