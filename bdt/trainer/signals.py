"""Preemption: SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves and exits 0.

Under the `deepspeed` launcher signals reach ranks one at a time, ~30 s apart (environment.md), so
a rank must not act on its own flag: `should_stop` all-reduces the flag (MAX) every step and every
rank stops at the same step, which the collective checkpoint save requires.

A rank whose launcher dies stops the same way (`watch_launcher` makes `should_stop` answer
STOP_SIGNAL): nothing else would end it, and a relaunch would meet it still writing (system §2).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types

import psutil
import torch

from bdt.trainer.distributed import all_reduce_max

DEEPSPEED_NODE_LAUNCHER = "deepspeed.launcher.launch"
LAUNCHER_GRACE_S = 300.0
_launcher_gone = threading.Event()


# Why the ranks stop (`StopFlag.should_stop`), ordered so that the all-reduced MAX wins.
GO_ON, LOCAL_REASON, STOP_SIGNAL = 0, 1, 2


class StopFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.requested = False
        self.signum: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.requested = True
        self.signum = signum

    def should_stop(self, device: torch.device, local: bool = False) -> int:
        """Collective (call on every rank each step): why the ranks stop, the same on every rank.
        GO_ON; LOCAL_REASON = some rank passed `local=True` (another reason, e.g. a time limit)
        and no rank got a signal; STOP_SIGNAL = some rank got a stop signal (preemption: save,
        exit, resume later). One all-reduce (MAX) serves both reasons."""
        stop = self.requested or _launcher_gone.is_set()
        mine = STOP_SIGNAL if stop else LOCAL_REASON if local else GO_ON
        return int(all_reduce_max(float(mine), device))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def watch_launcher(grace_s: float = LAUNCHER_GRACE_S, poll_s: float = 1.0
                   ) -> threading.Thread | None:
    """Stop this rank when its launcher dies: from then on `StopFlag.should_stop` answers
    STOP_SIGNAL (the loop saves at the next step boundary and exits, as on SIGTERM; a signal
    could land outside the loop and kill it mid-export), and a rank still running `grace_s`
    later (hung in a collective, say) is killed. The launcher is the
    parent process (torchrun, mp.spawn's parent, slurmstepd); under the `deepspeed` command it is
    also the parent's parent, since the per-node `deepspeed.launcher.launch` that starts the
    ranks outlives the command. A death shows as reparenting (zombies keep their pid), checked
    by a thread every `poll_s`, which also works where PR_SET_PDEATHSIG does not (a parent whose
    forking thread ends, another OS)."""
    parent = psutil.Process().parent()
    if parent is None or parent.pid == 1:
        return None  # no launcher (anymore) to watch
    checks = [(os.getppid, parent.pid)]
    try:
        if DEEPSPEED_NODE_LAUNCHER in " ".join(parent.cmdline()):
            checks.append((parent.ppid, parent.ppid()))
    except psutil.Error:
        pass

    def launcher_alive() -> bool:
        try:
            return all(current() == expected for current, expected in checks)
        except psutil.Error:  # the parent itself is gone
            return False

    def watch() -> None:
        while launcher_alive():
            time.sleep(poll_s)
        print(f"rank {os.environ.get('RANK', '?')} (pid {os.getpid()}): its launcher is gone: "
              f"stopping (a checkpoint at the next step, exit within {grace_s:.0f} s)",
              file=sys.stderr, flush=True)
        _launcher_gone.set()
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="bdt-launcher-watch", daemon=True)
    thread.start()
    return thread
