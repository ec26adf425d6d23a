"""A 2-rank run under the real `deepspeed` launcher whose terminal closes (a window, a dropped
ssh session) between two periodic checkpoints: every process used to die of the SIGHUP at once,
unsaved, and the next run went back to the last periodic checkpoint. Now the ranks (and their
prefetch worker processes) take the hang-up as a stop: they save at the next step boundary,
though their terminal refuses every write by then, and end; a rerun resumes from that step."""

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
from testkit import REPO, TINY_CONFIG
from trainutil import spawn_train, tiny_llm, train_overrides, write_shards

pytestmark = pytest.mark.slow

LOGGED = 3  # the step whose metrics line the terminal closes after


def _logged_steps(run_dir) -> list[int]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [rec["step"] for rec in map(json.loads, lines) if "loss" in rec]


def test_a_closed_terminal_saves_the_step_it_reached_and_a_rerun_resumes_there(tmp_path):
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
        os.execve(bash, [bash, "-c", '"$@"; exit $?', "bash", *launch], env)
    seen, started, status = b"", [], None
    try:
        deadline = time.monotonic() + 300
        while max(_logged_steps(run), default=0) < LOGGED:
            assert time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0], \
                seen.decode(errors="replace")[-3000:]
            if select.select([master], [], [], 0.2)[0]:  # a terminal that is read
                with_output = os.read(master, 65536)
                seen = (seen + with_output)[-20000:]
        started = psutil.Process(pid).children(recursive=True)
        assert sum("--local_rank" in " ".join(p.cmdline()) for p in started) == 2
        os.close(master)
        master = None
        while not (ended := os.waitpid(pid, os.WNOHANG))[0]:
            assert time.monotonic() < deadline, "the shell outlived its terminal"
            time.sleep(0.1)
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

    overrides = train_overrides(str(run), llm, shards, steps=step + 1, every=0,
                                extra=["export=false"])
    assert spawn_train(["--config", TINY_CONFIG, *overrides]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [step]
    assert json.loads((run / "summary.json").read_text())["step"] == step + 1
