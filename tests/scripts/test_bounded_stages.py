"""scripts/bounded_stages.sh: the GPU scripts' stages end within their limits, leave no process
behind, and a script stopped by a signal ends its running stage too."""

import os
import signal
import subprocess
import sys
import time

import pytest

from testkit import REPO

# A script of two stages: FIRST (a command given in the environment) and `after`.
SCRIPT = """set -uo pipefail
ulimit -S -c "$(ulimit -H -c)"  # core dumps on, where the machine allows them
cd "$REPO"
REHEARSAL=0
source scripts/bounded_stages.sh
begin_stages probe 1 "$1" || exit 1
stage first "$LIMIT" "$PY" -c "$FIRST" || [[ -z ${STOP_AFTER_FIRST:-} ]] || exit 1
stage after 5 "$PY" -c 'print("after ran")'
echo "failed: $(failed_stages)"
[[ -z $(failed_stages) ]]
"""
# Prints its pid (and, with CHILD, a child's pid) into the stage's log, then sleeps.
SLEEPER = """import os, signal, subprocess, sys, time
if os.environ.get("STUBBORN"):
    for s in (signal.SIGTERM, signal.SIGABRT):
        signal.signal(s, signal.SIG_IGN)
print("pid", os.getpid(), flush=True)
if os.environ.get("CHILD"):
    child = subprocess.Popen(["sleep", "60"], start_new_session=os.environ["CHILD"] == "escaped")
    print("pid", child.pid, flush=True)
    if os.environ["CHILD"] == "escaped":
        sys.exit(0)
time.sleep(60)
"""


def _start(tmp_path, limit: int, first: str = SLEEPER, **env) -> subprocess.Popen:
    script = tmp_path / "probe.sh"
    script.write_text(SCRIPT)
    # BDT_WHEELS=none: a checkout's ./wheels made for a GPU machine's Python stays out
    env = dict(os.environ, REPO=str(REPO), PYTHON=sys.executable, LIMIT=str(limit), FIRST=first,
               BDT_WHEELS="none", **env)
    env.pop("OUT", None)
    return subprocess.Popen(["bash", str(script), str(tmp_path / "out")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _pids(tmp_path, n: int) -> list[int]:
    log = tmp_path / "out" / "first.log"
    for _ in range(200):
        pids = [int(line.split()[1]) for line in log.read_text().splitlines()
                if line.startswith("pid ")] if log.exists() else []
        if len(pids) == n:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"{log}: no {n} pids")


def _alive(pid: int) -> bool:
    try:  # a zombie is gone for this purpose
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stages(tmp_path) -> dict[str, int]:
    rows = (tmp_path / "out" / "stages.tsv").read_text().split("\n")
    return {r.split("\t")[0]: int(r.split("\t")[1]) for r in rows if r}


def _seconds(tmp_path) -> dict[str, int]:
    rows = (tmp_path / "out" / "stages.tsv").read_text().split("\n")
    return {r.split("\t")[0]: int(r.split("\t")[2]) for r in rows if r}


def _finish(proc: subprocess.Popen, pids: list[int], timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out
    finally:  # the old behaviour leaves them running: do not leak them from the test
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_signal_to_the_scripts_group_ends_the_running_stage(tmp_path):
    """timeout puts the stage in a process group of its own: a SIGTERM/SIGINT to the script's
    group (Ctrl-C, a job killed) missed it, and the stage ran on (on a GPU) up to its limit."""
    proc = _start(tmp_path, 60, CHILD="same")
    pids = _pids(tmp_path, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    out = _finish(proc, pids, 20)
    assert time.monotonic() - t0 < 15
    assert not [p for p in pids if _alive(p)], out
    assert proc.returncode != 0 and "after skipped" in out
    assert _stages(tmp_path) == {"first": 134}  # ABRT, as a stage's timeout: stacks in the log


@pytest.mark.slow
def test_stage_ignoring_its_signal_is_killed_and_the_next_stage_runs(tmp_path):
    """KILL STAGE_KILL_S after the ABRT (10 s unless set: a knob, so that this test waits 1)."""
    proc = _start(tmp_path, 1, STUBBORN="1", CHILD="same", STAGE_KILL_S="1")
    pids = _pids(tmp_path, 2)
    out = _finish(proc, pids, 30)
    assert not [p for p in pids if _alive(p)], out
    assert _stages(tmp_path) == {"first": 137, "after": 0} and "after ran" in out
    assert _seconds(tmp_path)["first"] < 8 and "137 = killed 1 s later" in out
    assert proc.returncode != 0 and "failed: first" in out


@pytest.mark.slow
def test_a_process_that_left_the_stage_does_not_hold_the_script(tmp_path):
    """A child in a session of its own that keeps the stage's output open: the log was a pipe to
    tee, which waited for it (60 s here, forever for a daemon) past the stage's limit."""
    proc = _start(tmp_path, 5, CHILD="escaped")
    pids = _pids(tmp_path, 2)
    t0 = time.monotonic()
    out = _finish(proc, pids, 20)
    assert time.monotonic() - t0 < 10, out
    assert _stages(tmp_path) == {"first": 0, "after": 0}


@pytest.mark.slow
def test_stages_dump_no_core(tmp_path):
    """Where core dumps were on (common in containers), a stage ended by ABRT left a core file
    the size of its process in the checkout: tens of GB for the 1.2B trainer."""
    proc = _start(tmp_path, 5, first="import resource; print('core', "
                                      "resource.getrlimit(resource.RLIMIT_CORE)[0])")
    out = _finish(proc, [], 30)
    assert proc.returncode == 0, out
    assert "core 0" in (tmp_path / "out" / "first.log").read_text()


@pytest.mark.slow
def test_a_sigkilled_script_ends_its_running_stage(tmp_path):
    """SIGKILL runs no trap: the stage (in a process group of its own) ran out its limit, holding
    the GPU, after the script was gone."""
    proc = _start(tmp_path, 60)
    pids = _pids(tmp_path, 1)
    proc.kill()  # the script alone, not its group
    t0 = time.monotonic()
    while _alive(pids[0]) and time.monotonic() - t0 < 20:
        time.sleep(0.1)
    gone = not _alive(pids[0])
    _finish(proc, pids, 5)
    assert gone and time.monotonic() - t0 < 15


@pytest.mark.slow
def test_a_rerun_into_the_same_out_keeps_no_old_stage_log(tmp_path):
    """A stage the rerun never reached kept the first run's log beside the new table."""
    proc = _start(tmp_path, 5, first="print('first ran')")
    assert _finish(proc, [], 30) and (tmp_path / "out" / "after.log").exists()
    proc = _start(tmp_path, 5, first="raise SystemExit(3)", STOP_AFTER_FIRST="1")
    _finish(proc, [], 30)
    assert _stages(tmp_path) == {"first": 3} and not (tmp_path / "out" / "after.log").exists()


@pytest.mark.slow
@pytest.mark.parametrize("env, named", [
    ({"STAGE_KILL_S": "abc"}, "probe: STAGE_KILL_S=abc: give a number of seconds > 0"),
    ({"STAGE_KILL_S": "0"}, "probe: STAGE_KILL_S=0: give a number of seconds > 0"),
    ({"PROBE_LIMIT_SCALE": "1.5"}, "probe: PROBE_LIMIT_SCALE=1.5: give a whole number >= 1"),
])
def test_a_bad_knob_is_named_before_any_stage(tmp_path, env, named):
    """A bad STAGE_KILL_S failed every stage in its timeout (rc 125); a limit scale of 1.5 was
    a bash arithmetic error in each stage, which ran none and failed none: the script passed."""
    proc = _start(tmp_path, 5, first='print("first ran")', **env)
    out = _finish(proc, [], 30)
    assert proc.returncode != 0 and named in out, out
    assert "first ran" not in out and not (tmp_path / "out" / "stages.tsv").exists()
