"""bench/zero_memory.py's rank worker at a tiny size (a world of one): it builds the model and takes a
step the way the trainer does. It once called a setup helper with an outdated signature, and
`make bench` stopped there with a traceback from both ranks."""

import json
import subprocess
import sys

import pytest

import trainutil
from testkit import REPO

# worker() in a process of its own: it starts a process group and sets the rank's environment.
WORKER = """import sys
sys.path.insert(0, sys.argv[1])
import zero_memory
from bdt.training.distributed import free_port
zero_memory.worker(0, 1, free_port(), int(sys.argv[2]), sys.argv[3], zero_memory.HEAD_100M,
                   sys.argv[4])
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_worker_takes_a_step_and_reports_its_memory(tmp_path, stage):
    llm = trainutil.tiny_llm(str(tmp_path / "llm"))
    done = subprocess.run([sys.executable, "-c", WORKER, str(REPO / "bench"), str(stage), llm,
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["params"] > 0 and result["optimizer"] > 0
    assert result["peak_rss"] > result["params"]
