"""A stop signal while a trainer is still starting (model, data, resume: before step 1) ends it
at once, as a stopped run ends (exit 0, summary.json "stopped"), for both trainers alike; the
rerun trains as if the stopped start had never happened."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bdt.data.shapes import ShapesConfig
from bdt.data.shards import generate
from bdt.training.signals import StopFlag, StoppedBeforeStart
from testkit import REPO, TINY_CONFIG
from trainutil import tiny_llm, train_overrides, write_shards

TOKENIZER = ["model.ch=32", "model.ch_mult=[1]", "model.num_res_blocks=1", "model.z_channels=8",
             "data.size=16", "data.num_workers=0", "deepspeed.micro_batch_size=2",
             "logging.image_every=0", "logging.tensorboard=false", "checkpoint.every=1"]


def test_a_signal_before_start_raises_and_after_it_sets_the_flag():
    before = signal.getsignal(signal.SIGTERM)
    flag = StopFlag(started=False)
    try:
        with pytest.raises(StoppedBeforeStart, match=r"\(SIGTERM\) before step 1"):
            os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second one while unwinding: the flag only
        assert flag.requested
    finally:
        flag.restore()
    flag = StopFlag(started=False)
    try:
        flag.start()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signum == signal.SIGUSR1
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_stop_before_the_run_lock_exits_with_the_signals_status(tmp_path, monkeypatch, caplog):
    """Before rank 0 holds the run lock nothing may be written in the run directory (another job
    may hold it): no summary.json, so no exit 0 either, which a resume wrapper that did not send
    the signal reads as a finished run."""
    from bdt.training.tokenizer import loop

    def interrupted():  # the signal lands while the process group is set up
        raise StoppedBeforeStart(signal.SIGTERM)

    monkeypatch.setattr(loop, "init_distributed", interrupted)
    (tmp_path / "x.tar").write_bytes(b"")  # named, never read
    before = signal.getsignal(signal.SIGTERM)
    assert loop.main([f"run_dir={tmp_path / 'run'}", f"data.shards={tmp_path}/x.tar"]) == 143
    assert "stop signal (SIGTERM) before step 1" in caplog.text
    assert not (tmp_path / "run").exists() and signal.getsignal(signal.SIGTERM) is before


def _tokenizer_command(tmp_path, run_dir, steps):
    data = tmp_path / "images"
    if not data.exists():
        generate(ShapesConfig(out=str(data), num=4, sizes=["32"], per_shard=4, format="png"))
    return ["tokenizers/train.py", f"run_dir={run_dir}", f"data.shards={data}/shapes-000000.tar",
            f"steps={steps}", *TOKENIZER]


def _ar_command(tmp_path, run_dir, steps):
    if not (tmp_path / "llm").exists():
        write_shards(str(tmp_path / "tokens"), [(2, 2), (2, 3)], 1, 8)
        tiny_llm(str(tmp_path / "llm"))
    return ["bdt/train.py", "--config", TINY_CONFIG,
            *train_overrides(str(run_dir), str(tmp_path / "llm"), str(tmp_path / "tokens"),
                             steps=steps, zero=0, every=1)]


@pytest.mark.slow
@pytest.mark.parametrize("command", [_tokenizer_command, _ar_command], ids=["tokenizer", "ar"])
def test_sigterm_during_start_up_stops_cleanly_and_the_rerun_trains(tmp_path, command):
    run_dir = tmp_path / "run"
    # This checkout's bdt, not the one installed: the script's folder comes first on sys.path.
    env = {**{k: v for k, v in os.environ.items()
              if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")},
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, *command(tmp_path, run_dir, 2)], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        # Logged once the run lock is held, seconds before the first step (model, engine).
        seen = ""
        for line in proc.stderr:
            seen += line
            if "had no owner: it is now this run's" in line:
                break
        assert proc.poll() is None, seen[-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        rc, err = proc.returncode, seen + err  # the old trainers died of the signal: rc -15
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, err[-3000:]
    assert "stop signal (SIGTERM) before step 1: nothing to save" in err and "Traceback" not in err
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] is True
    assert not (run_dir / "RUN_LOCK").exists()
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")]
    done = subprocess.run([sys.executable, *command(tmp_path, run_dir, 1)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] is False and summary["step"] == 1


@pytest.mark.slow
def test_a_signal_while_blocked_in_native_code_still_ends_the_process(tmp_path):
    """The Python handler waits for the main thread to come back from native code: a rank stuck
    in the rendezvous (or a collective) for a rank that stopped ignored its own SIGTERM until the
    process-group timeout; the watcher ends it with the signal's status instead."""
    script = ("import datetime, threading, torch.distributed as dist\n"
              "from bdt.training import signals\n"
              "signals.STUCK_GRACE_S = 0.5\n"
              "flag = signals.StopFlag(started=False)\n"
              "store = dist.TCPStore('127.0.0.1', 0, 1, True, wait_for_workers=False)\n"
              # said once the main thread is surely inside the wait
              "threading.Timer(1.0, lambda: print('waiting', flush=True)).start()\n"
              "store.wait(['never set'], datetime.timedelta(seconds=120))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == "waiting\n", proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)  # the old code: stuck for the store's 120 s
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "stop signal (SIGTERM) before step 1, but the main thread is blocked" in err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallow
def test_a_stop_before_start_swallowed_by_a_finalizer_is_raised_again(monkeypatch):
    """A signal that lands in a finalizer raises StoppedBeforeStart there, where Python only
    reports it: the rank went on starting alone (chaos_resume.py --signal term --launcher torchrun
    saw rank 0 crash in its next collective, rank 1 gone). It is raised again."""
    from bdt.training import signals

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs (and raises) in here

    monkeypatch.setattr(signals, "STUCK_GRACE_S", 0.3)
    flag = StopFlag(started=False)
    try:
        with pytest.raises(StoppedBeforeStart):
            Finalized()
            for _ in range(300):  # start-up going on, in Python
                time.sleep(0.01)
        flag.settle()
        assert flag.requested
    finally:
        flag.restore()
