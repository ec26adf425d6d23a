"""A closed terminal (SIGHUP) stops training as SIGTERM does: the flag is set, and stdout and
stderr, the hung-up terminal whose writes now fail (EIO), go to /dev/null so that the save and
its log lines cannot crash. Under `nohup` (SIGHUP ignored at the start) it stays ignored."""

import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from bdt.training.signals import StopFlag
from testkit import terminal_job_signals

# On its terminal (a pty whose session it leads): waits for the stop, then prints and logs as a
# stopping trainer does, and notes each step of that in argv[1].
CHILD = """
import logging, sys, time
from bdt.entry import setup_logging
from bdt.training.signals import StopFlag
setup_logging()
flag = StopFlag()
print("stop-flag-set", flush=True)
deadline = time.monotonic() + 20
while not flag.requested and time.monotonic() < deadline:
    time.sleep(0.02)
note = open(sys.argv[1], "a")
note.write(f"requested {flag.requested} {flag.signum}\\n")
note.flush()
logging.getLogger("bdt.test").info("stop signal: saved step %d", 3)
print("saved step 3", flush=True)
sys.stderr.write("on stderr\\n")
sys.stderr.flush()
note.write("saved\\n")
"""


def _read_until(fd: int, text: bytes, timeout: float = 60) -> bytes:
    seen, deadline = b"", time.monotonic() + timeout
    while text not in seen:
        assert time.monotonic() < deadline, seen
        if select.select([fd], [], [], 0.2)[0]:
            seen += os.read(fd, 4096)
    return seen


def test_a_closed_terminal_stops_the_flag_and_what_follows_writes_nowhere(tmp_path):
    """The kernel hangs the pty up when its master closes and sends SIGHUP to the session's
    leader; a print after that raised EIO (had the process not died of the SIGHUP at once)."""
    note = tmp_path / "note"
    pid, master = pty.fork()
    if pid == 0:  # the child: its terminal is the pty
        terminal_job_signals()
        os.execv(sys.executable, [sys.executable, "-c", CHILD, str(note)])
    try:  # a marker no warning or traceback contains ("ready" is in "already")
        shown = _read_until(master, b"stop-flag-set")
    finally:
        os.close(master)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, (shown.decode(errors="replace"),
                                                    note.exists() and note.read_text())
    assert note.read_text().split("\n") == [f"requested True {int(signal.SIGHUP)}", "saved", ""]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT])
def test_a_stop_signal_ignored_at_the_start_stays_ignored(sig):
    """`nohup`: the job is to outlive its terminal; a script's background job (SIGINT ignored):
    Ctrl-C is for the foreground."""
    previous = signal.signal(sig, signal.SIG_IGN)
    try:
        flag = StopFlag()
        assert signal.getsignal(sig) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == flag._handle
        flag.restore()
    finally:
        signal.signal(sig, previous)


def test_output_that_is_not_a_terminal_is_left_alone(tmp_path):
    """A SIGHUP sent by hand to a run whose output goes to a file: its log goes on there."""
    child = ("import os, signal, sys\n"
             "from bdt.training.signals import StopFlag\n"
             "flag = StopFlag()\n"
             "os.kill(os.getpid(), signal.SIGHUP)\n"
             "print('after', flush=True, file=sys.stderr)\n"
             "sys.exit(0 if flag.requested else 3)\n")
    with open(tmp_path / "log", "w") as log:
        assert subprocess.run([sys.executable, "-c", child], stderr=log,
                              preexec_fn=terminal_job_signals).returncode == 0
    assert (tmp_path / "log").read_text() == "after\n"
