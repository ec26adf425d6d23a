"""Run COMMAND... and exit with its status only once every process it started has ended; with
128 + N instead if a SIGINT, SIGTERM or SIGHUP (N) reached this process meanwhile (the step was
stopped). SIGHUP (the terminal closed) counts unless it was ignored at the start (`nohup`).

    RUN_TO_END_PARENT=$$ python scripts/run_to_end.py COMMAND [ARG...]

scripts/demo.sh runs each step through this, in the background, and `wait`s for it: bash runs a
trap only once its foreground command has ended, while `wait` returns on a trapped signal, so a
SIGTERM to the script's PID alone reaches its trap at once. Why each part:
- Subreaper: the `deepspeed` runner dies at once on Ctrl-C, SIGTERM or SIGHUP while its launcher and
  ranks still save a checkpoint; orphans come here and are waited for, so the demo never exits
  (and a re-run never finds the run locked) while they run.
- A stop signal from the parent script is passed on to every process below, once: unless
  the same signal reached this process from elsewhere first (a signal to the process group, such
  as Ctrl-C, which the step had too).
- The parent's death sends this process a SIGTERM to pass on (PR_SET_PDEATHSIG): a SIGKILL to the
  script alone, or a signal just as it starts a step, stops the step too. RUN_TO_END_PARENT
  (default: the parent at this script's start) names it: a parent that died before the prctl
  sends nothing, and this process, then another's child, would run the step on; it runs none.
"""

import contextlib
import ctypes
import os
import signal
import sys

import psutil

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
STOPS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def main(argv: list[str]) -> int:
    parent = int(os.environ.pop("RUN_TO_END_PARENT", os.getppid()))
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:  # nohup: the step outlives the terminal
        STOPS.discard(signal.SIGHUP)  # (blocked, sigwaitinfo would take it all the same)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOPS | {signal.SIGCHLD})  # sigwaitinfo takes them
    for sig in (signal.SIGINT, signal.SIGQUIT):  # bash ignores them in a background job
        signal.signal(sig, signal.SIG_DFL)
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
    libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # it died before the prctl: nothing would stop the command
        return 128 + signal.SIGTERM
    # The command starts with no signal blocked, and SIGPIPE and SIGXFSZ not ignored (as Python
    # leaves them for itself).
    pid = os.posix_spawnp(argv[0], argv, os.environ, setsigmask=(),
                          setsigdef=(signal.SIGPIPE, signal.SIGXFSZ))
    status, direct, stopped_by = 1, set(), 0
    while True:
        info = signal.sigwaitinfo(STOPS | {signal.SIGCHLD})
        if info.si_signo == signal.SIGCHLD:
            try:
                while (ended := os.waitpid(-1, os.WNOHANG))[0]:
                    if ended[0] == pid:
                        status = os.waitstatus_to_exitcode(ended[1])
            except ChildProcessError:  # nothing left below
                break
            continue
        stopped_by = stopped_by or info.si_signo
        if info.si_pid != parent:
            direct.add(info.si_signo)
        elif info.si_signo not in direct:
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(info.si_signo)
    if stopped_by:  # the step was stopped, whatever it then returned (a trainer that saved: 1)
        return 128 + stopped_by
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
