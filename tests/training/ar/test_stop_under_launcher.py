"""A 2-rank run under the real `deepspeed` launcher, in a terminal, stopped between two periodic
checkpoints: the terminal closed (a window, a dropped ssh session: SIGHUP), Ctrl-C (SIGINT to
the foreground group), or SIGUSR1 to every process (SLURM's `scancel --signal=USR1`). Each used
to end the run unsaved: the hang-up's default action, Python's KeyboardInterrupt mid-step, the
prefetch worker process killed under its trainer; the next run went back to the last periodic
checkpoint. Now the ranks take each as a stop and their worker processes ignore it: they save at
the next step boundary (after a hang-up though their terminal refuses every write) and end; a
rerun resumes from that step."""

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import sys
import time

import psutil
import pytest

from bdt.training.distributed import free_port
from testkit import REPO, TINY_CONFIG, terminal_job_signals
from trainutil import spawn_train, tiny_llm, train_overrides, write_shards

pytestmark = pytest.mark.slow

LOGGED = 3  # the step whose metrics line the terminal closes after


def _logged_steps(run_dir) -> list[int]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [rec["step"] for rec in map(json.loads, lines) if "loss" in rec]


def _read_terminal(master: int, seen: bytes) -> bytes:
    """What the terminal shows, read as a window does: a terminal nobody reads fills up and
    blocks every write to it."""
    if select.select([master], [], [], 0.2)[0]:
        with contextlib.suppress(OSError):  # EIO: every process holding the terminal has ended
            seen = (seen + os.read(master, 65536))[-20000:]
    return seen


def _close(master: int, shell: int) -> None:
    os.close(master)


def _ctrl_c(master: int, shell: int) -> None:
    os.write(master, b"\x03")  # the line discipline signals the foreground process group


def _usr1_to_all(master: int, shell: int) -> None:
    """SLURM's `scancel --signal=USR1` (or --signal=USR1@T): every process of the job step."""
    job = psutil.Process(shell)
    for proc in [job, *job.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGUSR1)


@pytest.mark.parametrize("stop", [_close, _ctrl_c, _usr1_to_all], ids=["closed", "ctrl-c", "usr1"])
def test_a_stop_saves_the_step_it_reached(tmp_path, stop):
    llm = tiny_llm(str(tmp_path / "llm"))
    shards = os.path.dirname(write_shards(str(tmp_path / "s"), [(4, 4), (4, 8)], num_shards=2,
                                          per_shard=6)[0])
    run = tmp_path / "run"
    overrides = train_overrides(str(run), llm, shards, steps=100000, every=0,
                                extra=["export=false", "data.prefetch_worker=process"])
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    launch = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
              os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG, *overrides]
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO))
    # The terminal's session leader is a shell running the launch, as in a terminal window: the
    # kernel signals it when the terminal hangs up, and the launch's process group as it exits.
    bash = shutil.which("bash")
    pid, master = pty.fork()
    if pid == 0:
        os.chdir(tmp_path)
        terminal_job_signals()
        os.execve(bash, [bash, "-c", '"$@"; exit $?', "bash", *launch], env)
    seen, started, status = b"", [], None
    try:
        deadline = time.monotonic() + 300
        while max(_logged_steps(run), default=0) < LOGGED:
            assert time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0], \
                seen.decode(errors="replace")[-3000:]
            seen = _read_terminal(master, seen)
        started = psutil.Process(pid).children(recursive=True)
        assert sum("--local_rank" in " ".join(p.cmdline()) for p in started) == 2
        stop(master, pid)
        if stop is _close:
            master = None
        while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
            assert time.monotonic() < deadline, "the shell outlived the stop"
            seen = _read_terminal(master, seen) if master is not None else time.sleep(0.2) or seen
        status = ended[1]
        _, alive = psutil.wait_procs(started, timeout=120)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], \
            [" ".join(p.cmdline()) for p in alive]
    finally:
        if master is not None:
            os.close(master)
        for proc in started:
            if proc.is_running():
                proc.kill()
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    summary = json.loads((run / "summary.json").read_text())
    step = summary["step"]
    assert summary["stopped"] and summary["saved_step"] == step >= LOGGED, summary
    assert (run / "checkpoints" / f"step_{step:09d}" / "COMPLETE").exists()
    assert not (run / "RUN_LOCK").exists()
    if stop is not _close:  # a checkpoint like the closed case's, whose rerun resumes it below
        return

    overrides = train_overrides(str(run), llm, shards, steps=step + 1, every=0,
                                extra=["export=false"])
    assert spawn_train(["--config", TINY_CONFIG, *overrides]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [step]
    assert json.loads((run / "summary.json").read_text())["step"] == step + 1
