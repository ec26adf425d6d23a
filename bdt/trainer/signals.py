"""Preemption: SIGTERM / SIGUSR1 set a flag; the loop finishes its step, saves and exits 0.

Under the `deepspeed` launcher signals reach ranks one at a time, ~30 s apart (ENVIRONMENT.md), so
a rank must not act on its own flag: `should_stop` all-reduces the flag (MAX) every step and every
rank stops at the same step, which the collective checkpoint save requires.
"""

from __future__ import annotations

import signal
import types

import torch

from bdt.trainer.distributed import all_reduce_max


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
        0 = go on; 1 = some rank passed `local=True` (another reason, e.g. a time limit) and no
        rank got a signal; 2 = some rank got a stop signal (preemption: save, exit, resume later).
        One all-reduce (MAX) serves both reasons."""
        return int(all_reduce_max(2.0 if self.requested else 1.0 if local else 0.0, device))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
