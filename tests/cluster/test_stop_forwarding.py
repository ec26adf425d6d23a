"""A stop (SLURM's time-limit USR1, a preemption's TERM) reaches the ranks of a multi-node launch
as a SIGTERM they save on, through srun and cluster/deepspeed/launch.sh: srun answers a TERM of
its own with SIGKILL to every task, and DeepSpeed's launchers die of USR1."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bdt.cluster.resume import STOPPED

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# A rank: handles TERM and USR1 as the trainer does (a short save, then exit 0), says when ready.
RANK = """import os, pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def save(signum, frame):
    time.sleep(0.5)
    (out / "saved").write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
signal.signal(signal.SIGUSR1, save)
(out / "rank.pid").write_text(str(os.getpid()))
time.sleep(60)
"""

# `deepspeed` as launch.sh starts it: one rank (RANK, LOCAL_RANK set) and default signal handling.
DEEPSPEED = """#!{python}
import os, subprocess, sys
env = {{**os.environ, "RANK": "0", "LOCAL_RANK": "0"}}
sys.exit(subprocess.call([sys.executable, "-c", {rank!r}, {out!r}], env=env))
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {path.name}"
        assert time.monotonic() < end, f"timed out waiting for {path.name}"
        time.sleep(0.05)


def _reap(out: Path, *procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    if (out / "rank.pid").exists() and not (out / "saved").exists():
        try:
            os.kill(int((out / "rank.pid").read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("to_group", [False, True], ids=["task-only", "process-group"])
def test_launch_sh_turns_a_forwarded_usr1_into_a_save_of_its_ranks(tmp_path, to_group):
    """SLURM delivers srun's forwarded USR1 to the task alone (proctrack/cgroup) or to its process
    group: launch.sh once exec'd `deepspeed`, which died of it, and the ranks never saved."""
    out = tmp_path / "out"
    out.mkdir()
    fake = tmp_path / "bin" / "deepspeed"
    fake.parent.mkdir()
    fake.write_text(DEEPSPEED.format(python=sys.executable, rank=RANK, out=str(out)))
    fake.chmod(0o755)
    (tmp_path / "hostfile").write_text("n1 slots=1\nn2 slots=1\n")
    env = {**os.environ, "PATH": f"{fake.parent}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HOSTFILE": str(tmp_path / "hostfile"), "MASTER_ADDR": "n1", "NODE_RANK": "1",
           "BDT_LAUNCHER": "node"}
    node = subprocess.Popen(["bash", "cluster/deepspeed/launch.sh", "x.py"], cwd=REPO, env=env,
                            start_new_session=True)
    try:
        _wait_for(out / "rank.pid", node)
        time.sleep(0.3)  # the rank's handlers are in place
        if to_group:
            os.killpg(node.pid, signal.SIGUSR1)
        else:
            node.send_signal(signal.SIGUSR1)
        assert node.wait(timeout=60) == 0
        assert (out / "saved").read_text() in ("SIGTERM", "SIGUSR1")
    finally:
        _reap(out, node)


def test_the_wrapper_stops_an_srun_launch_with_usr1(tmp_path):
    """The wrapper stopped a launch whose ranks it cannot see by a SIGTERM to its process group;
    srun makes that a SIGKILL of every task (srun(1), SIGNALS): no rank saved at the time limit."""
    got = tmp_path / "got"
    srun = tmp_path / "bin" / "srun"  # records the signal it is sent, as srun would forward it
    srun.parent.mkdir()
    srun.write_text(f"""#!{sys.executable}
import pathlib, signal, sys, time
def record(signum, frame):
    pathlib.Path({str(got)!r}).write_text(signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGTERM, record)
signal.signal(signal.SIGUSR1, record)
pathlib.Path({str(tmp_path / "ready")!r}).touch()
time.sleep(60)
""")
    srun.chmod(0o755)
    wrapper = subprocess.Popen([sys.executable, "-m", "bdt.cluster.resume", "--run-dir",
                                str(tmp_path / "run"), "--", str(srun), "--nodes=2"], cwd=REPO)
    try:
        _wait_for(tmp_path / "ready", wrapper)
        wrapper.send_signal(signal.SIGUSR1)  # the batch script's trap, at the time limit
        assert wrapper.wait(timeout=60) == STOPPED
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert got.read_text() == "SIGUSR1"
