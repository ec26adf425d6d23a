"""The `bdt` command: one subcommand group per module of bdt/commands/, each with
`register(subparsers)`, so this file only lists them. Command modules import heavy libraries
(torch, ray) inside their handlers, so `bdt --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from bdt.config import ConfigError
from bdt.entry import leave_dead_terminal, setup_logging, stops_on

COMMAND_MODULES = [
    "bdt.commands.data",
    "bdt.commands.tokenizer",
    "bdt.commands.sample",
    "bdt.commands.eval",
    "bdt.commands.model",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bdt", description="Train BitDance-style binary-token text-to-image models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class Stopped(BaseException):
    """A SIGTERM or SIGHUP, raised in the main thread: the default action ended the process at
    once and left a staged output's folder behind (beside --out, or in the temp dir for an s3://
    one). Not an Exception, so no best-effort `except Exception` swallows it."""


def _raise_stopped(owner: int):
    """The SIGTERM and SIGHUP handler of process `owner`."""
    def handler(signum: int, frame) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        if os.getpid() != owner:  # a forked child inherited it: the default action, as before
            os.kill(os.getpid(), signum)
            return
        if signum == signal.SIGHUP:
            leave_dead_terminal()  # the "stopped by" line and tqdm's last one must not fail
        raise Stopped(signum)
    return handler


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal's rule
        handler = _raise_stopped(os.getpid())
        for sig in filter(stops_on, (signal.SIGTERM, signal.SIGHUP)):
            previous[sig] = signal.signal(sig, handler)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, OSError, ValueError, FloatingPointError) as exc:
        # Expected user errors: one line, no traceback, non-zero exit. FloatingPointError:
        # sampling that overflowed (a guidance scale of 1e38), which bdt raises with its cause.
        print(f"bdt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as exc:  # what it was writing has been removed
        signum = exc.args[0] if isinstance(exc, Stopped) else signal.SIGINT
        print(f"bdt {args.command}: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
