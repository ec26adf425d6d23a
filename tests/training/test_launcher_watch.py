"""The launcher watch of a rank (bdt/training/distributed.py): a rank whose launcher (torchrun,
the `deepspeed` command) is killed before or during init_distributed exits at once with a clear
message instead of waiting in the rendezvous for the process-group timeout (30 min); a rank whose
launcher lives on is left alone. Real processes: a launcher-like parent starts a rank-like child
that runs bdt's own code path."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from bdt.training.distributed import free_port

pytestmark = pytest.mark.slow

# Starts argv[3:] once path argv[2] exists ("-": at once) and stays; argv[1] names it (as
# `deepspeed.launcher.launch` in a cmdline; `torchrun`: in a new session, as torchrun does).
LAUNCHER = ("import os, subprocess, sys, time\n"
            "while sys.argv[2] != '-' and not os.path.exists(sys.argv[2]): time.sleep(0.02)\n"
            "p = subprocess.Popen(sys.argv[3:], start_new_session=sys.argv[1] == 'torchrun')\n"
            "print(p.pid, flush=True); p.wait(); "
            "time.sleep(120)")
# A rank: `import bdt` first (as an entry script does; argv[2] "late": only after `go`), then
# the slow imports, then waits for `go` (work before the process group: data checks), then init.
RANK = """
import pathlib, sys, time
work = pathlib.Path(sys.argv[1])
def wait_for(name):
    while not (work / name).exists():
        time.sleep(0.02)
if sys.argv[2] == "late":
    wait_for("go")
import bdt
from bdt.training import distributed
(work / "ready").write_text("")
wait_for("go")
distributed.init_distributed(use_deepspeed=False)
(work / "initialised").write_text(str(distributed.launcher_gone.is_set()))
time.sleep(2.5)  # the watch polls every second meanwhile
(work / "finished").write_text(str(distributed.launcher_gone.is_set()))
"""
# Runs argv[1:] as a subreaper (as tini -s or systemd --user do): orphans below it come here.
SUBREAPER = """
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
subprocess.Popen(sys.argv[1:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.05)
"""
GONE = "its launcher is gone before training began"


def _start(tmp_path, world_size: int, node_launcher: bool = False, spawn_after: str = "-",
           wrapper: tuple = (), agent: bool = False, record: str = "early",
           through_shell: bool = False):
    """(outermost process, its stdout: a line with each started pid, outermost first). `agent`:
    the launcher is like torchrun's (torch loaded, TORCHELASTIC_RUN_ID for the rank)."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(world_size),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if agent:
        env["TORCHELASTIC_RUN_ID"] = "test"
    argv = [sys.executable, "-c", RANK, str(tmp_path), record]
    if node_launcher:  # the `deepspeed` command's per-node launcher, which outlives the command
        argv = [sys.executable, "-c", LAUNCHER, "deepspeed.launcher.launch", spawn_after, *argv]
    if through_shell:  # `torchrun --no-python run.sh`: a shell between the launcher and the rank
        argv = ["sh", "-c", '"$@"; exit $?', "sh", *argv]
    launcher = ["-c", "import torch\n" + LAUNCHER, "torchrun"] if agent else ["-c", LAUNCHER, "x"]
    with open(tmp_path / "stderr", "w") as log:
        outer = subprocess.Popen([*wrapper, sys.executable, *launcher, "-", *argv],
                                 env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    return outer, outer.stdout


def _pids(lines, count: int) -> list[psutil.Process]:
    return [psutil.Process(int(lines.readline())) for _ in range(count)]


def _wait_for(path, procs, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert procs[-1].is_running() and time.monotonic() < deadline, (path.parent / "stderr"
                                                                        ).read_text()
        time.sleep(0.05)


def _stop_all(outer, procs):
    for proc in [*procs, outer]:
        try:
            proc.kill()
        except (psutil.Error, ProcessLookupError):
            pass
    outer.wait()


def _exits_within(rank, seconds: float) -> None:
    assert not psutil.wait_procs([rank], timeout=seconds)[1], f"the rank runs after {seconds} s"


@pytest.mark.parametrize("node_launcher", [False, True], ids=["torchrun", "deepspeed"])
def test_a_rank_whose_launcher_died_before_init_exits_at_once(tmp_path, node_launcher):
    outer, lines = _start(tmp_path, world_size=2, node_launcher=node_launcher)
    procs = _pids(lines, 1 + node_launcher)
    try:
        _wait_for(tmp_path / "ready", procs)
        outer.kill()  # only the launcher (under deepspeed: the command; its node launcher lives)
        outer.wait()
        (tmp_path / "go").write_text("")
        _exits_within(procs[-1], 10)  # not the 30 min rendezvous timeout of a world of two
        assert GONE in (tmp_path / "stderr").read_text()
        assert not (tmp_path / "initialised").exists()
    finally:
        _stop_all(outer, procs)


def test_a_rank_whose_launcher_dies_during_the_rendezvous_exits_at_once(tmp_path):
    outer, lines = _start(tmp_path, world_size=2)  # rank 1 never comes: init blocks
    procs = _pids(lines, 1)
    try:
        (tmp_path / "go").write_text("")
        _wait_for(tmp_path / "ready", procs)
        time.sleep(2)  # inside init_process_group by now
        assert procs[-1].is_running() and not (tmp_path / "initialised").exists()
        outer.kill()
        outer.wait()
        _exits_within(procs[-1], 10)
        assert GONE in (tmp_path / "stderr").read_text()
    finally:
        _stop_all(outer, procs)


@pytest.mark.parametrize("through_shell", [False, True], ids=["direct", "through-a-shell"])
def test_a_rank_whose_launcher_lives_is_not_stopped(tmp_path, through_shell):
    outer, lines = _start(tmp_path, world_size=1, agent=True, through_shell=through_shell)
    procs = _pids(lines, 1)
    try:
        (tmp_path / "go").write_text("")
        _exits_within(procs[-1], 120)
        assert (tmp_path / "finished").read_text() == "False", (tmp_path / "stderr").read_text()
        assert "launcher is gone" not in (tmp_path / "stderr").read_text()
    finally:
        _stop_all(outer, procs)


def test_a_torchrun_worker_orphaned_before_it_imported_bdt_exits_at_once(tmp_path):
    """Its launcher died in the moment between starting it and its `import bdt`, so bdt's record
    names the subreaper it went to; a torchrun worker's launcher has torch loaded, that one not."""
    outer, lines = _start(tmp_path, world_size=2, agent=True, record="late",
                          wrapper=(sys.executable, "-c", SUBREAPER))
    procs = _pids(lines, 1)
    try:
        launcher = psutil.Process(procs[0].ppid())
        launcher.kill()
        launcher.wait(timeout=10)
        assert procs[0].ppid() == outer.pid
        (tmp_path / "go").write_text("")
        _exits_within(procs[0], 60)  # its imports, then at once
        assert GONE in (tmp_path / "stderr").read_text()
        assert not (tmp_path / "initialised").exists()
    finally:
        _stop_all(outer, procs)


def test_a_rank_started_after_its_deepspeed_command_died_exits_at_once(tmp_path):
    """The command died while its node launcher was still starting up: the node launcher is
    already an orphan when it starts the rank, which no record of the rank's can show."""
    outer, lines = _start(tmp_path, world_size=2, node_launcher=True,
                          spawn_after=str(tmp_path / "spawn"))
    procs = _pids(lines, 1)
    try:
        outer.kill()
        outer.wait()
        (tmp_path / "go").write_text("")
        (tmp_path / "spawn").write_text("")
        procs += _pids(lines, 1)
        _exits_within(procs[-1], 60)  # its imports, then at once
        assert GONE in (tmp_path / "stderr").read_text()
        assert not (tmp_path / "initialised").exists()
    finally:
        _stop_all(outer, procs)


NEW_PID_NAMESPACE = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc",
                     "--kill-child")


@pytest.mark.skipif(subprocess.run([*NEW_PID_NAMESPACE, "true"], capture_output=True).returncode,
                    reason="no user and pid namespaces here")
@pytest.mark.parametrize("node_launcher", [False, True], ids=["torchrun", "deepspeed"])
def test_a_launcher_that_is_pid_1_is_not_mistaken_for_a_dead_one(tmp_path, node_launcher):
    """A container whose entrypoint is the launcher: the rank's parent (or the node launcher's)
    is pid 1 from the start, which is also where orphans go."""
    outer, _ = _start(tmp_path, world_size=1, node_launcher=node_launcher,
                      wrapper=NEW_PID_NAMESPACE)
    finished, deadline = tmp_path / "finished", time.monotonic() + 120
    try:
        (tmp_path / "go").write_text("")
        while not (finished.exists() and finished.read_text()):
            stderr = (tmp_path / "stderr").read_text()
            assert outer.poll() is None and time.monotonic() < deadline, stderr
            assert "launcher is gone" not in stderr
            time.sleep(0.05)
        assert finished.read_text() == "False"
        assert "launcher is gone" not in (tmp_path / "stderr").read_text()
    finally:
        outer.kill()  # and with it (--kill-child) the namespace
        outer.wait()
