"""The resume-on-restart wrapper (python -m bdt.cluster.resume): a SIGKILLed rank of a real 2-rank
training is relaunched and the run resumes and finishes; bounded restarts; stop signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bdt.cluster.resume import DONE, GAVE_UP, STOPPED, USAGE
from testkit import training_ranks
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
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
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


def test_bad_training_config_fails_before_launching(tmp_path):
    out = subprocess.run([*WRAPPER, "--", "torchrun", "bdt/train.py", "--config",
                          "configs/train/tiny.yaml", "model.backbone.path=x", "data.root=y",
                          "stages.0.stepz=3"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == USAGE and "stepz" in out.stderr
    out = subprocess.run([*WRAPPER, "--", "srun", "bash", "-c", "python x.py"], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == USAGE and "--run-dir" in out.stderr


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
