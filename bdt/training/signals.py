"""Preemption: SIGTERM, SIGUSR1, SIGHUP or SIGINT sets a flag; the loop finishes its step (an
in-loop task under way, its image batch: training/ar/tasks.py), saves, exits 0. A hang-up (the
terminal closed) sends the output to /dev/null first (bdt.entry.leave_dead_terminal). A signal
ignored at the start stays ignored (`nohup`'s SIGHUP, a background job's SIGINT). A second
signal while stopping does not cut the save: under torchrun a Ctrl-C reaches a rank twice (from
the terminal, and passed on by torchrun).
Before the first step (`StopFlag(started=False)` until `start`) there is nothing to save and
start-up may take minutes (building the model, listing data, loading a checkpoint): the signal
raises `StoppedBeforeStart` there instead, and the entry point exits 0 saying so. Python runs
that handler only once the main thread is back in Python: one blocked in native code (the
rendezvous, or a collective, waiting for a rank that stopped) would ignore the signal until the
process-group timeout, so a watcher thread ends the process (status 128 + signal) when the
handler has not run STUCK_GRACE_S after the signal arrived. A StoppedBeforeStart raised where it
is swallowed (a finalizer the signal landed in) would leave the rank going on alone into the next
collective: one that reaches no trainer (`settle`) within STUCK_GRACE_S is raised again.

Under the `deepspeed` launcher signals reach ranks one at a time, ~30 s apart (environment.md), so
a rank must not act on its own flag: `should_stop` all-reduces the flag (MAX) every step and every
rank stops at the same step, which the collective checkpoint save requires.

A rank whose launcher dies stops the same way (distributed.watch_launcher makes `should_stop`
answer STOP_SIGNAL): nothing else would end it, and a relaunch would meet it still writing (system §2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import types

import torch

from bdt.entry import STOP_SIGNALS, leave_dead_terminal, stops_on
from bdt.training.distributed import all_reduce_max, launcher_gone

# Why the ranks stop (`StopFlag.should_stop`), ordered so that the all-reduced MAX wins: a
# diverged step (bdt.training.divergence) must never be saved, whatever else asked to stop.
GO_ON, LOCAL_REASON, STOP_SIGNAL, DIVERGED = 0, 1, 2, 3
STUCK_GRACE_S = 5.0  # a main thread in Python runs the handler within milliseconds
log = logging.getLogger(__name__)
_watching: set[int] = set()  # wakeup fds of this process's StopFlags before start


def _forget_wakeup_in_child() -> None:
    """A forked child's signals are its own: written to the parent's pipe, they would end the
    parent as stuck (its handler never runs for them)."""
    if _watching:
        with contextlib.suppress(ValueError):  # forked from another thread: none was set there
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_wakeup_in_child)


class StoppedBeforeStart(BaseException):
    """A stop signal before the first step, raised in the main thread where it landed. Not an
    Exception (as KeyboardInterrupt), so no best-effort `except Exception` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.recorded = False  # set once rank 0's summary.json says the run stopped

    @property
    def exit_code(self) -> int:
        """A stopped run's 0 once summary.json records the stop; else (not rank 0, or before
        the run lock) the signal's own 128 + signum: a resume wrapper that did not send the
        signal reads an exit 0 without a summary as a finished run."""
        return 0 if self.recorded else 128 + self.signum

    def __str__(self) -> str:
        return (f"stop signal ({signal.Signals(self.signum).name}) before step 1: nothing to "
                f"save, stopped")


class StopFlag:
    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, started: bool = True):
        self.requested = False
        self.signum: int | None = None
        self.started = started
        self._owner = os.getpid()  # a forked child inherits the handler, not the start-up
        self._previous = {}
        self._handled = threading.Event()
        # The trainer met the StoppedBeforeStart raised (`settle`), or training began: a raise
        # that met neither within STUCK_GRACE_S was swallowed (a finalizer's) and is raised again.
        self._settled = threading.Event()
        self._raised = self._again = False
        self._wakeup: tuple[int, int, int] | None = None  # (read end, write end, previous fd)
        self._watcher: threading.Thread | None = None
        for sig in filter(stops_on, signals):
            self._previous[sig] = signal.signal(sig, self._handle)
        if not started:
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            # Written by the C-level handler as a signal arrives, whatever the main thread does.
            previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._wakeup = (read_fd, write_fd, previous)
            _watching.add(write_fd)
            self._watcher = threading.Thread(target=self._watch_stuck, args=(read_fd,),
                                             name="bdt-stop-watch", daemon=True)
            self._watcher.start()

    def start(self) -> None:
        """The first step begins: from now on a signal is saved at a step boundary."""
        self.started = True
        self._end_watch()

    def settle(self) -> None:
        """The trainer is ending (a StoppedBeforeStart reached it, or another error): no stop is
        raised again from here on."""
        self._settled.set()

    def _watch_stuck(self, read_fd: int) -> None:
        # A 0 byte is _end_watch's. The read end stays open until then: a second signal written
        # to a closed pipe is reported as an error by the C-level handler.
        while (got := os.read(read_fd, 1)) and got[0] and got[0] not in self._previous:
            pass
        if not got or not got[0]:
            return
        signum = got[0]
        if self._handled.wait(STUCK_GRACE_S) and (
                not self._raised or self._settled.wait(STUCK_GRACE_S) or self._raise_again(signum)):
            return
        log.error("pid %d: stop signal (%s) before step 1, but the main thread is blocked in "
                  "native code (a rendezvous or collective waiting for a rank that stopped?): "
                  "exiting now with status %d", os.getpid(), signal.Signals(signum).name,
                  128 + signum)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(128 + signum)  # no other thread may change a signal's handler

    def _raise_again(self, signum: int) -> bool:
        """The StoppedBeforeStart raised reached no trainer (a finalizer or callback the signal
        landed in swallowed it, leaving this rank to go on alone into a collective): raise it
        again. Whether that one was met in time."""
        log.warning("pid %d: the stop before step 1 was lost (raised inside a finalizer?): "
                    "raising it again", os.getpid())
        self._handled.clear()
        self._again = True
        os.kill(os.getpid(), signum)
        return self._handled.wait(STUCK_GRACE_S) and self._settled.wait(STUCK_GRACE_S)

    def _end_watch(self) -> None:
        self._settled.set()
        if self._wakeup is not None:
            read_fd, write_fd, previous = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous)
            with contextlib.suppress(OSError):  # the watcher has returned already: a full pipe
                os.write(write_fd, b"\0")  # not a signal number: the watcher returns
            self._watcher.join(STUCK_GRACE_S)  # at once but after a signal not yet handled
            os.close(write_fd)
            os.close(read_fd)
            _watching.discard(write_fd)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if signum == signal.SIGHUP:
            leave_dead_terminal()  # before anything prints: the save must not fail on it
        self.requested = True
        self.signum = signum
        again, self._again = self._again and self._wakeup is not None, False  # (watch not ended)
        if (not self.started or again) and os.getpid() == self._owner:
            self.started = True  # a second signal while unwinding only sets the flag
            self._raised = True
            self._handled.set()
            raise StoppedBeforeStart(signum)
        self._handled.set()

    def signalled(self) -> bool:
        """This rank's own stop, no collective: a signal, or its launcher gone."""
        return self.requested or launcher_gone.is_set()

    def should_stop(self, device: torch.device, local: bool = False, diverged: bool = False) -> int:
        """Collective (call on every rank each step): why the ranks stop, the same on every rank.
        GO_ON; LOCAL_REASON = some rank passed `local=True` (another reason, e.g. a time limit)
        and no rank got a signal; STOP_SIGNAL = some rank got a stop signal (preemption: save,
        exit, resume later); DIVERGED = some rank passed `diverged=True` (a non-finite loss:
        stop without saving). One all-reduce (MAX) serves every reason."""
        mine = (DIVERGED if diverged else STOP_SIGNAL if self.signalled()
                else LOCAL_REASON if local else GO_ON)
        return int(all_reduce_max(float(mine), device))

    def restore(self) -> None:
        self._end_watch()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
