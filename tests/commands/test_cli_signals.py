"""A `bdt sample` stopped by SIGTERM (a scheduler, `kill`), Ctrl-C or a closed terminal (SIGHUP)
while it samples leaves neither its output nor its staging folder, and ends with one line and the
signal's code."""

import signal
import subprocess
import sys

import pytest

from testkit import terminal_job_signals

pytestmark = pytest.mark.slow

# `bdt sample` with the model replaced by one that signals itself while it samples, that is
# inside the staged output: the signal arrives while the staging folder exists.
CHILD = """
import os, signal, sys, time
from types import SimpleNamespace
import bdt.commands.sample as sample
from bdt.cli import main

def images(*args, **kwargs):
    os.kill(os.getpid(), int(sys.argv[1]))
    time.sleep(30)  # the signal ends this, or the test times out

model = SimpleNamespace(cfg=SimpleNamespace(parallel_num=4))
sample.load_for_args = lambda args: (SimpleNamespace(source="m", model=model, images=images),
                                     (16, 16), SimpleNamespace(cfg_scale=1.0, num_steps=1,
                                                               cfg_schedule="constant", seed=0))
sys.exit(main(["sample", "--model", "m", "--prompt", "a red circle", "--out", sys.argv[2]]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stopped_sample_leaves_nothing_and_says_why(tmp_path, sig):
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(int(sig)), str(work / "out")],
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=terminal_job_signals)
    assert proc.returncode == 128 + sig, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"bdt sample: stopped by {sig.name}"]
    assert list(work.iterdir()) == []  # no out/, no .out.bdt-staging-* beside it
