"""A stop signal that arrives while an in-loop evaluation runs ends it at its next image batch:
the ranks save the step they are at and exit 0 within seconds. They used to finish the whole
evaluation (minutes at scale) and train one more step before they saw the stop, past a
cluster's usual 30 s grace period: SIGKILLed unsaved, the run lost up to `checkpoint.every`
steps."""

import glob
import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from bdt.training.distributed import free_port
from loopback_torchrun import TORCHRUN
from testkit import REPO, TINY_CONFIG
from trainutil import (spawn_train, tiny_image_tokenizer, tiny_llm, train_overrides,
                       write_shards)

pytestmark = pytest.mark.slow

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
           PYTHONPATH=str(REPO))
# 240 prompts, one per batch, ~0.8 s each on one core: 100 s or more for the two ranks
LONG_EVAL = ["eval.every=2", "eval.per_category=0", "eval.width=32", "eval.height=32",
             "eval.steps=16", "eval.batch=1"]
# Step 2 inside a log window: its partial window is logged and saved as at any stop.
PLAIN = ["logging.every=4", "export=false"]
STOPPED_WITHIN_S = 20  # the batch under way, a tiny checkpoint, the exit; loaded 2-core machines


def _rank(launcher: psutil.Process, local_rank: str) -> psutil.Process:
    for proc in launcher.children(recursive=True):
        try:
            if proc.environ().get("LOCAL_RANK") == local_rank:
                return proc
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {local_rank} under the launcher")


def _wait_for_eval(eval_dir, proc, log) -> None:
    """Until rank 0 opens the staging folder of step 2's report: the evaluation has begun."""
    deadline = time.monotonic() + 300
    while not (eval_dir.is_dir() and any(n.startswith(".step_000000002") for n in
                                         os.listdir(eval_dir))):
        assert proc.poll() is None and time.monotonic() < deadline, open(log).read()[-3000:]
        time.sleep(0.1)


def test_a_stop_during_the_evaluation_saves_its_step_within_seconds(tmp_path):
    llm = tiny_llm(str(tmp_path / "llm"))
    tok = tiny_image_tokenizer(str(tmp_path / "tok"))
    write_shards(str(tmp_path / "s"), [(4, 4), (4, 8)], num_shards=2, per_shard=6, factor=2)
    run = tmp_path / "run"
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), os.path.join(REPO, "bdt", "train.py"),
           "--config", TINY_CONFIG,
           *train_overrides(str(run), llm, str(tmp_path / "s"), steps=100000, every=0,
                            extra=[f"data.tokenizer={tok}", *LONG_EVAL, *PLAIN])]
    log = str(tmp_path / "torchrun.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_for_eval(run / "eval", proc, log)
            time.sleep(1)  # a few batches in
            # Rank 1 alone, as the `deepspeed` launcher's ranks get theirs ~30 s apart: the
            # ranks must still end the evaluation at one batch (else a collective hangs).
            _rank(psutil.Process(proc.pid), "1").send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=STOPPED_WITHIN_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"still running {STOPPED_WITHIN_S} s after the signal: "
                                     f"{open(log).read()[-3000:]}") from None
        finally:
            if proc.poll() is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
    text = open(log).read()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] and summary["step"] == summary["saved_step"] == 2, summary
    ck = run / "checkpoints" / "step_000000002"
    saved = json.loads((ck / "COMPLETE").read_text())
    assert saved["step"] == 2
    assert glob.glob(str(run / "checkpoints" / "step_*")) == [str(ck)]  # no step after it
    # The cut evaluation recorded nothing: no scores, no report, no staging folder left.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if any(k.startswith("eval") for k in r)]
    assert os.listdir(run / "eval") == []
    # The same checkpoint, engine and per-rank state (RNG, stream) alike, as a stop at step 2
    # without an evaluation: the resumed run goes on as that one would.
    ref = tmp_path / "ref"
    assert spawn_train(["--config", TINY_CONFIG, *train_overrides(
        str(ref), llm, str(tmp_path / "s"), steps=100000, every=0,
        extra=[f"data.tokenizer={tok}", *PLAIN, "fault.sigterm_at_step=2"])]) == 0
    expected = json.loads((ref / "checkpoints" / "step_000000002" / "COMPLETE").read_text())
    assert saved["files"] == expected["files"]
    assert [r for r in records if r.get("window_partial")] and \
        [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in map(
            json.loads, (ref / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
