"""What every entry point does around its work: drop the launcher's rank argument before the
config sees it, set up logging (one format, the rank in every line), fail with one line, and
outlive a closed terminal long enough to stop cleanly."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import sys
from typing import Sequence


def _rank_number(flag: str, value: str) -> int:
    """The launcher's rank argument; anything else ends the entry point with one line."""
    try:
        return int(value)
    except ValueError:
        fail(f"command line: {flag} must be a whole number, got {value!r}")
        raise  # not reached: fail exits


def split_launcher_args(argv: Sequence[str]) -> tuple[list[str], int | None]:
    """Remove `--local_rank=N` / `--local_rank N` (added by the deepspeed launcher).

    Returns the remaining arguments and the rank it carried (also exported as LOCAL_RANK when
    the launcher did not set it), so a strict config never sees the launcher's argument.
    """
    rest: list[str] = []
    local_rank: int | None = None
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag and i + 1 < len(args):
                local_rank = _rank_number(flag, args[i + 1])
                i += 1
                break
            if arg.startswith(flag + "="):
                local_rank = _rank_number(flag, arg.split("=", 1)[1])
                break
        else:
            rest.append(arg)
        i += 1
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    return rest, local_rank


LOG_FORMAT = "%(asctime)s rank %(rank)s %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    """Adds the rank the launcher gave this process (RANK; 0 in a plain process)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = os.environ.get("RANK", "0")
        return True


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (pytest and redirections replace it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _) -> None:
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send the `bdt.*` loggers' messages to stderr, one format with the rank in every line;
    called once by each entry point (idempotent). A command's own output (tables, written
    paths) goes to stdout with print instead."""
    logger = logging.getLogger("bdt")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)


def fail(message: str, code: int = 2) -> None:
    """Print one error line to stderr and exit (used by entry points for ConfigError & co)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


# What bdt's trainers take as a stop (bdt.training.signals): preemption, SLURM's time-limit
# warning, a closed terminal, Ctrl-C.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP, signal.SIGINT)


def ignore_stop_signals() -> None:
    """In a trainer's data worker process. A stop sent to the process group or to every process
    of a job (SLURM's `scancel --signal`, a closed terminal, Ctrl-C) reaches the workers too:
    killed under the trainer, they turned its save at the next step boundary into a crash. The
    trainer stops them; torch's loader ends its own workers when the trainer is done (or gone)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def stops_on(sig: int) -> bool:
    """Whether stop signal `sig` is to stop this process (call before setting its handler): not
    where it was ignored at the start. `nohup` ignores SIGHUP (the job outlives its terminal), a
    script's background job runs with SIGINT ignored (Ctrl-C is the foreground's)."""
    return signal.getsignal(sig) is not signal.SIG_IGN


def leave_dead_terminal() -> None:
    """Called on a hang-up: from now on stdout and stderr, where they are the (gone) terminal,
    write to /dev/null. A write to a hung-up terminal fails (EIO), and print() would turn the
    stop's save into a crash; the run's own files say where it stopped, and nobody reads the
    closed window. A terminal is told by its character device: a hung-up one answers no
    isatty(); /dev/null, the only other one a job's output meets, stays what it was."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):  # closed: nothing writes there
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(null, fd)
    finally:
        os.close(null)
