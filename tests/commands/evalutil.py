"""Helpers for the `bdt sample` / `bdt eval` tests."""

from __future__ import annotations

import os
import subprocess
import sys

BUCKET = (16, 16)  # px; the tiny tokenizer halves each side -> 8x8 tokens, P = 4 -> 16 AR steps


def run_bdt(*args: str) -> subprocess.CompletedProcess:
    """The installed `bdt` entry point in a child process (the real CLI path)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "bdt.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)
