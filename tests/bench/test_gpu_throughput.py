"""bench/gpu_throughput.py (scripts/gpu_check.sh's throughput stage) at a tiny size on CPU: what its
result file says when a backend never finishes."""

import json
import os
import subprocess
import sys

import pytest

import trainutil
from testkit import REPO

TINY = ["--budget", "512", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1",
        "--intermediate", "64", "--head-width", "64", "--head-depth", "1", "--precision", "fp32",
        "--steps", "1", "--warmup", "1", "--profile-steps", "0", "--compile", "none"]
# gpu_throughput.main() in a process of its own (it starts a process group), whose steps under
# flex end the process as a stage's timeout would: at once, nothing after them runs. varlen and
# flash run flex as on a GPU at P = 4 (there every row is block-causal).
KILLED_UNDER_FLEX = """import os, sys
sys.path.insert(0, sys.argv[1])
import gpu_throughput
from bdt.model.ar import BitDanceModel
real_set = BitDanceModel.set_attn_backend
BitDanceModel.set_attn_backend = lambda self, name: real_set(
    self, "flex" if name in ("varlen", "flash") else name)
real = gpu_throughput.timed_steps
def steps(engine, *args):
    if engine.module.backend == "flex":
        os._exit(124)
    return real(engine, *args)
gpu_throughput.timed_steps = steps
sys.argv = ["gpu_throughput.py", *sys.argv[2:]]
gpu_throughput.main()
"""


@pytest.mark.slow
def test_backend_killed_mid_step_is_on_record_as_not_finished(tmp_path):
    """flex hung on the first GPU run until the stage's timeout killed the process: the result
    file then held sdpa alone, and the flex goal said "not run". Measured last, flex still hung
    first: inside varlen, which runs flex for block-causal rows, named as varlen's, and the
    kernels alone (varlen's and flash's exact causal ones among them) were never timed."""
    llm = trainutil.tiny_llm(str(tmp_path / "llm"))
    done = subprocess.run([sys.executable, "-c", KILLED_UNDER_FLEX, str(REPO / "bench"), "--llm",
                           llm, "--backends", "sdpa,varlen,flash,flex", "--name", "probe", *TINY],
                          capture_output=True, text=True,
                          env=dict(os.environ, BDT_BENCH_RESULTS=str(tmp_path)))
    assert done.returncode == 124, done.stderr[-2000:]
    d = json.loads((tmp_path / "probe.json").read_text())
    assert "mfu" in d["results"]["backends"]["sdpa"]
    assert d["results"]["backends"]["flex"]["failed"].startswith("did not finish")
    assert d["results"]["backends"].keys() == {"sdpa", "flex"}
    assert d["results"]["attention_alone"]["sdpa"]["fwd_bwd_ms"] > 0
    flex_goal = next(g for g in d["goals"] if g["goal"].startswith("16.1"))
    assert flex_goal["value"].startswith("did not finish") and flex_goal["met"] is False
