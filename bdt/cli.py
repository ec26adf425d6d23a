"""The `bdt` command: one subcommand group per module of bdt/commands/, each with
`register(subparsers)`, so this file only lists them. Command modules import heavy libraries
(torch, ray) inside their handlers, so `bdt --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bdt.config import ConfigError
from bdt.entry import setup_logging

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, OSError, ValueError, FloatingPointError) as exc:
        # Expected user errors: one line, no traceback, non-zero exit. FloatingPointError:
        # sampling that overflowed (a guidance scale of 1e38), which bdt raises with its cause.
        print(f"bdt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
