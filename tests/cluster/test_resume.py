"""The resume-on-restart wrapper (python -m bdt.cluster.resume): a SIGKILLed rank of a real 2-rank
training is relaunched and the run resumes and finishes; bounded restarts; stop signals."""

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bdt import storage
from bdt.cluster import resume
from bdt.cluster.resume import CANNOT_START, DONE, GAVE_UP, STOPPED, USAGE, Resumer, main
from bdt.cluster.run_state import RunPaths
from bdt.training.run_dir import LAUNCH_ERROR, record_launch_error
from loopback_torchrun import torchrun_on_path
from testkit import terminal_job_signals, training_ranks
from trainutil import read_metrics, tiny_llm, write_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WRAPPER = [sys.executable, "-m", "bdt.cluster.resume"]


def events(run_dir) -> list[dict]:
    path = Path(run_dir) / "resume.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float, what: str, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"wrapper exited ({proc.returncode}) before {what}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkilled_rank_is_relaunched_and_the_run_resumes(tmp_path):
    shards = os.path.dirname(write_shards(str(tmp_path / "shards"), [(4, 4), (4, 8), (8, 4)],
                                          num_shards=2, per_shard=10)[0])
    llm = tiny_llm(str(tmp_path / "llm"))
    run = tmp_path / "run"
    train = ["torchrun", "--standalone", "--nproc-per-node", "2", "bdt/train.py",
             "--config", "configs/train/tiny.yaml", f"run_dir={run}", f"model.backbone.path={llm}",
             f"data.root={shards}", "stages.0.steps=10", "checkpoint.every=2", "export=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": torchrun_on_path(tmp_path)}
    # An earlier launch's error (fixed since) neither stops the run nor outlives its start.
    record_launch_error(str(run), ValueError("an error fixed since"))
    wrapper = subprocess.Popen([*WRAPPER, "--backoff", "0.5", "--max-restarts", "2", "--", *train],
                               cwd=REPO, env=env)
    try:
        marker = run / "checkpoints" / "step_000000002" / "COMPLETE"
        wait_for(marker.exists, 300, "the first complete checkpoint", wrapper)
        victim = wait_for(lambda: list(training_ranks(wrapper.pid).values())[-1:], 30,
                          "a rank process")[0]
        victim.send_signal(signal.SIGKILL)  # one rank dies, as on a crashed GPU
        assert wrapper.wait(timeout=400) == DONE
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    log = events(run)
    assert [e["event"] for e in log] == ["launch", "restart", "launch", "done"]
    crash, relaunch = log[1], log[2]
    assert crash["exit_code"] != 0 and crash["checkpoint_step"] >= 2
    assert relaunch["attempt"] == 2 and relaunch["checkpoint_step"] == crash["checkpoint_step"]
    resumed = [json.loads(line)["resumed_from_step"] for line in open(run / "metrics.jsonl")
               if "resumed_from_step" in line]
    assert resumed == [crash["checkpoint_step"]]  # the relaunch continued, it did not restart
    assert max(read_metrics(str(run))) == 10
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 10 and not summary["stopped"]
    assert not (run / LAUNCH_ERROR).exists()
    assert not training_ranks(os.getpid())  # nothing left running


def test_restarts_are_bounded_and_progress_resets_the_count(tmp_path):
    failing = [sys.executable, "-c", "import sys; sys.exit(7)"]
    rc = subprocess.run([*WRAPPER, "--run-dir", str(tmp_path / "a"), "--max-restarts", "2",
                         "--backoff", "0", "--", *failing]).returncode
    assert rc == GAVE_UP
    log = events(tmp_path / "a")
    assert [e["event"] for e in log] == ["launch", "restart"] * 2 + ["launch", "gave_up"]
    assert {e["exit_code"] for e in log if "exit_code" in e} == {7}

    # Each launch completes one more checkpoint, then fails; the third one finishes. With one
    # restart allowed in a row without progress, only the progress keeps it going.
    ck = tmp_path / "b" / "checkpoints"
    script = (f"import json, os, pathlib, sys; ck = pathlib.Path({str(ck)!r}); "
              f"n = len(list(ck.glob('step_*'))) + 1; d = ck / f'step_{{n:09d}}'; "
              f"d.mkdir(parents=True); (d / 'COMPLETE').write_text('{{}}'); "
              f"n < 3 and sys.exit(1); "
              f"pathlib.Path({str(tmp_path / 'b' / 'summary.json')!r}).write_text("
              f"json.dumps({{'stopped': False}}))")
    rc = subprocess.run([*WRAPPER, "--run-dir", str(tmp_path / "b"), "--max-restarts", "1",
                         "--backoff", "0", "--", sys.executable, "-c", script]).returncode
    assert rc == DONE
    assert [e.get("checkpoint_step") for e in events(tmp_path / "b")] == [None, 1, 1, 2, 2, 3]


def test_a_command_that_cannot_run_and_an_unwritable_event_log_are_no_crash(tmp_path):
    """A launch that cannot start (not found, not executable) once ended the wrapper with a
    traceback and exit 1 (a Kubernetes Job retries that); one failed append to resume.jsonl
    ended the supervision mid-run."""
    proc = subprocess.run([*WRAPPER, "--run-dir", str(tmp_path / "a"), "--",
                           str(tmp_path / "no-such-launcher")], capture_output=True, text=True)
    assert proc.returncode == CANNOT_START, proc.stderr
    assert "cannot run" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "resume.jsonl").mkdir()  # every append fails
    failing = [sys.executable, "-c", "import sys; sys.exit(7)"]
    proc = subprocess.run([*WRAPPER, "--run-dir", str(tmp_path / "b"), "--max-restarts", "2",
                           "--backoff", "0", "--", *failing], capture_output=True, text=True)
    assert proc.returncode == GAVE_UP, proc.stderr  # supervised to the end all the same
    assert proc.stderr.count("cannot append to") == 6 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("summary", [b"[1]", None, b"\xff\xfe"])
def test_a_torn_event_log_and_a_damaged_summary_are_no_crash(tmp_path, summary):
    """A summary.json written during the launch that is JSON but no object, a directory or not
    JSON ended the wrapper with a traceback; an event log torn mid-record (a full disk, a kill)
    had the next event appended to the torn line, lost to any reader."""
    (tmp_path / "resume.jsonl").write_text('{"time": 1, "event": "launch", "attempt": 1}\n'
                                           '{"time": 2, "event": "resta')
    path = str(tmp_path / "summary.json")
    write = (f"import os; os.mkdir({path!r})" if summary is None else
             f"open({path!r}, 'wb').write({summary!r})")
    proc = subprocess.run([*WRAPPER, "--run-dir", str(tmp_path), "--max-restarts", "0", "--",
                           sys.executable, "-c", write], capture_output=True, text=True)
    assert proc.returncode == DONE and "Traceback" not in proc.stderr, proc.stderr
    assert f"{path}" in proc.stderr and "taking exit 0 as finished" in proc.stderr
    assert [e["event"] for e in events(tmp_path)] == ["launch", "launch", "note", "done"]


def test_progress_counts_checkpoints_older_than_a_damaged_newest_one(tmp_path):
    """The trainer passed over a damaged step 10 and resumed further back: the checkpoints it
    then completes are progress although step 10 stays the newest."""
    ck = tmp_path / "checkpoints"
    (ck / "step_000000010").mkdir(parents=True)
    (ck / "step_000000010" / "COMPLETE").write_text("damaged")
    script = (f"import json, pathlib, sys; ck = pathlib.Path({str(ck)!r}); "
              f"n = len(list(ck.glob('step_*'))); d = ck / f'step_{{n:09d}}'; "
              f"d.mkdir(); (d / 'COMPLETE').write_text(json.dumps({{'step': n}})); "
              f"n < 3 and sys.exit(1); "
              f"pathlib.Path({str(tmp_path / 'summary.json')!r}).write_text("
              f"json.dumps({{'stopped': False}}))")
    rc = subprocess.run([*WRAPPER, "--run-dir", str(tmp_path), "--max-restarts", "1",
                         "--backoff", "0", "--", sys.executable, "-c", script]).returncode
    assert rc == DONE
    assert [e["event"] for e in events(tmp_path)] == ["launch", "restart"] * 2 + ["launch", "done"]


def test_the_wrapper_supervises_without_importing_torch(tmp_path):
    """Listing the checkpoints imported torch and DeepSpeed: seconds of a shared core at each
    start of the wrapper, for a listing and a small JSON read."""
    ck = tmp_path / "checkpoints"
    for tag, marker in (("step_000000002", '{"step": 2, "time": 5.0}'), ("step_000000004", "{")):
        (ck / tag).mkdir(parents=True)
        (ck / tag / "COMPLETE").write_text(marker)
    (ck / "step_000000006").mkdir()  # no marker: not complete
    code = ("import sys; from bdt.cluster.run_state import complete_checkpoints; "
            "from bdt.cluster.resume import main; "
            f"print(complete_checkpoints({str(ck)!r} + '/')); "
            f"rc = main(['--run-dir', {str(tmp_path)!r}, '--', sys.executable, '-c', '']); "
            "print(rc, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == [
        "{'step_000000002': (2, 5.0), 'step_000000004': (4, None)}", f"{DONE} False"], out.stderr
    assert events(tmp_path)[0]["checkpoint_step"] == 4


def test_a_launch_failing_after_it_finished_and_saved_is_done(tmp_path):
    """A rank that aborts while exiting (rare: environment.md) after the run's last checkpoint
    and summary: nothing is left to train, so no relaunch; a failure before the end restarts."""
    script = ("import json, pathlib, sys; run = pathlib.Path(sys.argv[1]); "
              "d = run / 'checkpoints' / 'step_000000005'; d.mkdir(parents=True); "
              "(d / 'COMPLETE').write_text(json.dumps({'step': 5})); "
              "(run / 'summary.json').write_text("
              "json.dumps({'step': int(sys.argv[2]), 'stopped': False})); sys.exit(134)")
    for last, expected in ((5, ["launch", "note", "done"]), (4, ["launch", "gave_up"])):
        run = tmp_path / f"ran_to_{last}"
        rc = subprocess.run([*WRAPPER, "--run-dir", str(run), "--max-restarts", "0",
                             "--backoff", "0", "--", sys.executable, "-c", script, str(run),
                             str(last)]).returncode
        assert [e["event"] for e in events(run)] == expected
        assert rc == (DONE if last == 5 else GAVE_UP)


def test_a_killed_wrapper_stops_its_launch(tmp_path):
    """SIGKILL of the wrapper (a scheduler tearing the job down) reaches the launch as SIGTERM,
    so a requeued job never meets the old one's ranks."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    wrapper = subprocess.Popen([*WRAPPER, "--run-dir", str(tmp_path), "--backoff", "0", "--",
                                *sleeper])
    child = None
    try:
        wait_for(lambda: events(tmp_path), 60, "the launch", wrapper)
        child = wait_for(psutil.Process(wrapper.pid).children, 30, "the child", wrapper)[0]
        wrapper.kill()
        wrapper.wait()
        assert not psutil.wait_procs([child], timeout=30)[1]
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        if child is not None and child.is_running():
            child.kill()


# A launch's process whose wrapper dies between the fork and the PDEATHSIG request.
ORPHANED_LAUNCH = """import os, signal, time
from bdt.cluster.launch_processes import term_when_parent_dies
wrapper = os.getpid()
signal.signal(signal.SIGTERM, lambda *_: None)  # the wrapper's handler, inherited until exec
if os.fork():
    os._exit(0)  # the wrapper is killed
while os.getppid() == wrapper:
    time.sleep(0.01)
term_when_parent_dies(wrapper)
time.sleep(2)
print("the launch ran on")
"""


def test_a_launch_whose_wrapper_died_as_it_started_it_ends(tmp_path):
    """A wrapper killed as it started a launch (a scheduler's teardown at a relaunch): the death
    signal asked for after the wrapper died never came, and one that came before the exec went
    to the wrapper's inherited SIGTERM handler; the launch ran on beside a requeued job."""
    out = subprocess.run([sys.executable, "-c", ORPHANED_LAUNCH], capture_output=True, text=True,
                         timeout=60)
    assert "ran on" not in out.stdout and "Traceback" not in out.stderr, out.stderr


def test_ranks_of_a_killed_torchrun_are_killed_with_it(tmp_path):
    """torchrun starts each rank in a session of its own: killing the launch's process group
    after the launcher died (SIGKILLed, OOM) left the ranks running beside the relaunch."""
    rank_pid = tmp_path / "rank.pid"
    # stands in for torchrun: one rank (RANK/LOCAL_RANK set) in a new session, then waits
    launcher = [sys.executable, "-c", "import os, subprocess, sys, time; p = subprocess.Popen("
                "[sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True, "
                "env={**os.environ, 'RANK': '0', 'LOCAL_RANK': '0'}); "
                f"open({str(rank_pid)!r}, 'w').write(str(p.pid)); time.sleep(120)"]
    wrapper = subprocess.Popen([*WRAPPER, "--run-dir", str(tmp_path), "--max-restarts", "0",
                                "--", *launcher])
    rank = None
    try:
        rank = psutil.Process(int(wait_for(lambda: rank_pid.exists() and rank_pid.read_text(),
                                           60, "the rank", wrapper)))
        time.sleep(2.5)  # the wrapper has looked at the launch (once a second)
        psutil.Process(wrapper.pid).children()[0].kill()  # the launcher dies, its rank does not
        assert wrapper.wait(timeout=60) == GAVE_UP
        assert not psutil.wait_procs([rank], timeout=10)[1], "the rank outlived the launch"
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
        if rank is not None and rank.is_running():
            rank.kill()


def test_stop_signal_ends_the_launch_and_exits_stopped(tmp_path):
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    wrapper = subprocess.Popen([*WRAPPER, "--run-dir", str(tmp_path), "--backoff", "0", "--",
                                *sleeper])
    try:
        wait_for(lambda: events(tmp_path), 60, "the launch", wrapper)
        children = wait_for(psutil.Process(wrapper.pid).children, 30, "the child", wrapper)
        child = children[0]
        wrapper.send_signal(signal.SIGUSR1)  # SLURM's time-limit warning
        assert wrapper.wait(timeout=60) == STOPPED
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE
    last = events(tmp_path)[-1]
    assert last["event"] == "stopped" and last["signal"] == "SIGUSR1"


def test_a_closed_terminal_stops_the_launch_and_the_wrapper_exits_stopped(tmp_path):
    """The wrapper in a terminal that closes (SIGHUP to the session's leader): it died of the
    signal, its launch (in a session of its own, out of the terminal's reach) got only the
    death signal's SIGTERM, and no event said the run stopped. Now it is a stop as SIGTERM is:
    the launch saves, the wrapper says so where it can (the terminal refuses every write) and
    exits STOPPED."""
    saved = tmp_path / "saved"
    saver = (f"import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, lambda *_: ("
             f"pathlib.Path({str(saved)!r}).touch(), sys.exit(0))); print('saver-started', flush=True); "
             f"time.sleep(120)")
    pid, master = pty.fork()
    if pid == 0:  # the wrapper leads the terminal's session, as a shell's `exec` would
        terminal_job_signals()
        os.execv(sys.executable, [*WRAPPER, "--run-dir", str(tmp_path), "--backoff", "0",
                                  "--", sys.executable, "-c", saver])
    try:
        seen, deadline = b"", time.monotonic() + 60
        while b"saver-started" not in seen:  # not "ready": a warning's "already" has it
            assert time.monotonic() < deadline, seen
            if select.select([master], [], [], 0.2)[0]:
                seen += os.read(master, 4096)
    finally:
        os.close(master)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == STOPPED
    assert saved.exists()
    last = events(tmp_path)[-1]
    assert last["event"] == "stopped" and last["signal"] == "SIGHUP", last


def test_bad_training_config_fails_before_launching(monkeypatch, capsys):
    """In this process: a wrapper process would spend seconds importing torch for the config."""
    monkeypatch.chdir(REPO)
    assert main(["--", "torchrun", "bdt/train.py", "--config", "configs/train/tiny.yaml",
                 "model.backbone.path=x", "data.root=y", "stages.0.stepz=3"]) == USAGE
    assert "stepz" in capsys.readouterr().err
    assert main(["--", "srun", "bash", "-c", "python x.py"]) == USAGE
    assert "--run-dir" in capsys.readouterr().err


def test_repeated_stop_signals_let_the_ranks_save(tmp_path):
    """SLURM's cancel or preemption sends TERM to the wrapper and to the batch shell, whose trap
    forwards it again: the ranks still get their save, and exit 0 after the stop (no summary
    readable here) is a stop to requeue, not a finished run."""
    saved = tmp_path / "saved"
    saver = [sys.executable, "-c", "import signal, sys, time, pathlib; signal.signal(signal.SIGTERM, "
             f"lambda *_: (time.sleep(1), pathlib.Path({str(saved)!r}).touch(), sys.exit(0))); "
             "time.sleep(120)"]
    wrapper = subprocess.Popen([*WRAPPER, "--run-dir", str(tmp_path), "--backoff", "0", "--",
                                *saver])
    try:
        wait_for(lambda: events(tmp_path), 60, "the launch", wrapper)
        wait_for(psutil.Process(wrapper.pid).children, 30, "the child", wrapper)
        time.sleep(0.5)  # the child's handler is in place
        wrapper.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # two deliveries, not one pending signal
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=60) == STOPPED
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert saved.exists()


def test_an_input_error_before_the_first_step_stops_at_once(tmp_path):
    """A missing backbone under torchrun: every rank fails before training and torchrun exits
    1, as for a crash; the trainer's record tells the wrapper, which stops without restarting."""
    shards = os.path.dirname(write_shards(str(tmp_path / "shards"), [(4, 4)], num_shards=1,
                                          per_shard=4)[0])
    run = tmp_path / "run"
    out = subprocess.run([*WRAPPER, "--backoff", "60", "--", "torchrun", "--standalone",
                          "--nproc-per-node", "2", "bdt/train.py", "--config",
                          "configs/train/tiny.yaml", f"run_dir={run}",
                          f"model.backbone.path={tmp_path / 'no-llm'}", f"data.root={shards}"],
                         cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PATH": torchrun_on_path(tmp_path)})
    assert out.returncode == CANNOT_START, out.stderr[-3000:]
    assert [e["event"] for e in events(run)] == ["launch", "cannot_start"]
    assert "no-llm' does not exist" in events(run)[-1]["error"]["message"]
    assert "not restarting" in out.stderr


def test_a_stale_error_record_is_ignored_and_a_timeout_is_retried(tmp_path):
    """A record left by an earlier launch (an input error since fixed) does not stop a launch
    that crashed without one; a record of a timeout before the first step is restarted."""
    record_launch_error(str(tmp_path), ValueError("an input error fixed since"))
    count = tmp_path / "launches"
    script = (f"import json, pathlib, sys; from bdt.training.run_dir import record_launch_error; "
              f"c = pathlib.Path({str(count)!r}); "
              f"n = len(c.read_text()) + 1 if c.exists() else 1; c.write_text('x' * n); "
              f"n == 2 and record_launch_error({str(tmp_path)!r}, TimeoutError('store timed out')); "
              f"n < 3 and sys.exit(1); "
              f"pathlib.Path({str(tmp_path / 'summary.json')!r}).write_text("
              f"json.dumps({{'stopped': False}}))")
    out = subprocess.run([*WRAPPER, "--run-dir", str(tmp_path), "--max-restarts", "5",
                          "--backoff", "0", "--", sys.executable, "-c", script], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == DONE, out.stderr
    log = events(tmp_path)
    assert [e["event"] for e in log] == ["launch", "restart"] * 2 + ["launch", "done"]
    assert "error" not in log[1] and "fixed since" not in out.stderr
    assert log[3]["error"]["message"] == "store timed out" and "store timed out" in out.stderr


def test_a_flaky_listing_is_not_progress(tmp_path):
    """Each launch hides or shows the one checkpoint (a listing that misses it, then sees it
    again) and fails: no launch writes a checkpoint, so the restarts run out."""
    ck = tmp_path / "checkpoints"
    (ck / "step_000000001").mkdir(parents=True)
    (ck / "step_000000001" / "COMPLETE").write_text(json.dumps({"step": 1, "time": 5.0}))
    hidden = tmp_path / "hidden"
    script = (f"import pathlib, sys; ck, hid = pathlib.Path({str(ck)!r}), "
              f"pathlib.Path({str(hidden)!r}); "
              f"ck.rename(hid) if ck.exists() else hid.rename(ck); sys.exit(1)")
    runner = subprocess.Popen([*WRAPPER, "--run-dir", str(tmp_path), "--max-restarts", "2",
                               "--backoff", "0", "--", sys.executable, "-c", script])
    try:
        wait_for(lambda: len(events(tmp_path)) >= 12 or runner.poll() is not None, 120,
                 "the wrapper to give up")
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.wait() == GAVE_UP
    assert [e["event"] for e in events(tmp_path)] == ["launch", "restart"] * 2 + ["launch",
                                                                                   "gave_up"]


def test_a_failed_listing_names_the_checkpoint_root_once(s3_stoppable, tmp_path, monkeypatch,
                                                        capsys):
    """In this process: a store's error names the root already ("cannot list checkpoints in X:
    listing checkpoints in X: ..."); a bug's own message does not, and the warning names it."""
    root = storage.join(s3_stoppable.bucket, "ck")
    resumer = Resumer(["true"], RunPaths(str(tmp_path), root), 1, 0.0, 0.0, 0.0)
    s3_stoppable.stop()
    assert resumer.checkpoints() == {}
    monkeypatch.setattr(resume, "complete_checkpoints", lambda root: 1 / 0)
    assert resumer.checkpoints() == {}
    store, bug = capsys.readouterr().err.splitlines()
    assert store.count(root) == 1 and "EndpointConnectionError" in store, store
    assert bug.endswith(f"cannot list checkpoints in {root}: division by zero"), bug


def test_a_master_port_freed_while_waiting_is_launched(tmp_path):
    """An earlier launch's process that still holds the port for a moment: the wrapper waits."""
    import socket
    import threading

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    threading.Timer(4.0, held.close).start()  # longer than the wrapper takes to start
    began = time.time()
    out = subprocess.run([*WRAPPER, "--run-dir", str(tmp_path), "--", sys.executable, "-c", ""],
                         env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == DONE, out.stderr
    launches = [e for e in events(tmp_path) if e["event"] in ("launch", "cannot_start")]
    assert [e["event"] for e in launches] == ["launch"] and launches[0]["time"] >= began + 4.0


def test_as_pid_1_the_wrapper_says_orphans_are_not_reaped(tmp_path):
    """A container's init (PID 1) must reap the orphans a launch leaves; the wrapper does not,
    and says what to run it under (train-job.yaml shares the pod's process namespace)."""
    as_init = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]
    if subprocess.run([*as_init, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a PID namespace here (unshare)")
    cmd = [*WRAPPER, "--run-dir", str(tmp_path), "--", sys.executable, "-c", ""]
    first = subprocess.run([*as_init, *cmd], capture_output=True, text=True, timeout=60)
    assert first.returncode == DONE, first.stderr
    assert "running as PID 1" in first.stderr and "shareProcessNamespace" in first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert again.returncode == DONE and "PID 1" not in again.stderr


def test_a_finished_run_relaunched_launches_nothing(tmp_path, monkeypatch, capsys):
    """A requeue or resubmission of a run that finished once launched it again: every rank
    reloaded the last checkpoint and the export was written again. With the same config the
    wrapper now says so and launches nothing; a changed config or a stopped run still launches.
    The wrapper runs in this process: each process would spend seconds importing torch."""
    from omegaconf import OmegaConf

    from bdt.config import save_resolved
    from bdt.train import load_config

    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    args = ["--config", "configs/train/tiny.yaml", f"run_dir={run}", "model.backbone.path=x",
            "data.root=y", "stages.0.steps=4"]
    save_resolved(OmegaConf.to_object(load_config(args)), str(run))  # as the trainer does
    (run / "checkpoints" / "step_000000004").mkdir(parents=True)
    (run / "checkpoints" / "step_000000004" / "COMPLETE").write_text('{"step": 4, "time": 1.0}')
    launched = tmp_path / "launched"
    # stands in for the launcher: the wrapper reads the training config after bdt/train.py
    cmd = [sys.executable, "-c", f"open({str(launched)!r}, 'a').write('x')", "bdt/train.py"]

    def relaunch(summary: dict, *extra: str) -> str:
        (run / "summary.json").write_text(json.dumps(summary))
        launched.unlink(missing_ok=True)
        rc = main(["--", *cmd, *args, *extra])
        err = capsys.readouterr().err
        assert rc == DONE, err
        return err

    finished = {"step": 4, "stopped": False, "timed_out": False}
    err = relaunch(finished)
    assert not launched.exists() and "already finished at step 4" in err
    relaunch(finished, "stages.0.steps=6")  # more steps: trains on
    assert launched.exists()
    relaunch({**finished, "stopped": True})
    assert launched.exists()
    relaunch({**finished, "timed_out": True})  # its time limit ended it early
    assert launched.exists()


def test_the_tokenizer_trainer_under_the_wrapper(tmp_path, monkeypatch, capsys):
    """The wrapper reads a tokenizer command's run dir from its config (it asked for --run-dir),
    an error the trainer meets before its first step stops it at once (it was restarted like a
    crash), and the finished run's summary makes a relaunch launch nothing. The wrapper runs in
    this process but for the training (its time limit): a process would spend seconds importing
    torch to read the config."""
    from bdt.data.shapes import ShapesConfig
    from bdt.data.shards import generate

    generate(ShapesConfig(out=str(tmp_path / "data"), num=8, sizes=["32"], per_shard=4,
                          format="png"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "RUN_ID").write_text("not an id\n")  # the trainer refuses it at set-up
    args = ["--backoff", "60", "--", sys.executable, "tokenizers/train.py",
            f"run_dir={run}", f"data.shards={tmp_path / 'data'}", "steps=2", "model.ch=32",
            "model.ch_mult=[1,1]", "model.num_res_blocks=1", "model.z_channels=8",
            "data.size=16", "data.num_workers=0", "deepspeed.micro_batch_size=2",
            "logging.tensorboard=false"]
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(args) == CANNOT_START, capsys.readouterr().err[-3000:]
    assert [e["event"] for e in events(run)] == ["launch", "cannot_start"]
    assert "holds no run id" in events(run)[-1]["error"]["message"]
    (run / "RUN_ID").unlink()
    out = subprocess.run([*WRAPPER, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == DONE, out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["stopped"] is False and not summary["timed_out"]
    assert not (run / LAUNCH_ERROR).exists() and (run / "export" / "config.json").exists()
    assert main(args) == DONE and "already finished at step 2" in capsys.readouterr().err
