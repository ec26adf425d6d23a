"""`torchrun --nproc_per_node 2 bdt/train.py`: trains, evaluates in the loop (shapes suite,
judged, logged), and a SIGTERM sent to torchrun (cluster preemption) reaches both ranks, which
finish their step, checkpoint it and end their loop cleanly.

torchrun's own exit status after a SIGTERM is 1 whatever its workers do (its agent re-raises
the signal as a SignalException once the workers are down): a requeue wrapper judges the save
by the checkpoint's completion marker, not by the launcher's status (environment.md)."""

import json
import os
import signal
import subprocess
import time

import pytest

from bdt.training.distributed import free_port
from loopback_torchrun import TORCHRUN
from testkit import REPO, TINY_CONFIG
from trainutil import tiny_image_tokenizer, tiny_llm, train_overrides, write_shards

pytestmark = pytest.mark.slow

ENV = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def wait_for_record(path, key, proc, log):
    """Poll metrics.jsonl until a record holds `key`; fail if the job ends first."""
    while True:
        if os.path.exists(path):
            with open(path) as f:
                records = [json.loads(line) for line in f if key in line]
            if records:
                return records[0]
        if proc.poll() is not None:
            raise AssertionError(f"torchrun ended (rc {proc.returncode}) before logging {key}: "
                                 f"{open(log).read()[-3000:]}")
        time.sleep(0.5)


def test_torchrun_trains_evaluates_and_sigterm_checkpoints(tmp_path):
    llm = tiny_llm(str(tmp_path / "llm"))
    tok = tiny_image_tokenizer(str(tmp_path / "tok"))
    write_shards(str(tmp_path / "s"), [(4, 4), (4, 8)], num_shards=2, per_shard=6, factor=2)
    run_dir = tmp_path / "run"
    extra = [f"data.tokenizer={tok}", "eval.every=2", "eval.per_category=1", "eval.width=8",
             "eval.height=8", "eval.steps=2", "export=false"]
    # far more steps than the test waits for: only the signal ends this run
    cmd = [*TORCHRUN, "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.join(REPO, "bdt", "train.py"), "--config", TINY_CONFIG,
           *train_overrides(str(run_dir), llm, str(tmp_path / "s"), steps=100000, every=0,
                            extra=extra)]
    log = str(tmp_path / "torchrun.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        try:
            first_eval = wait_for_record(str(run_dir / "metrics.jsonl"), "eval_overall", proc, log)
            os.kill(proc.pid, signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = open(log).read()
    assert rc == 1 and "got signal: 15" in text, text[-3000:]
    assert text.count("Traceback") == 1  # torchrun's own: no rank failed
    # the evaluation: suite prompts generated, judged, scored per category, report written
    report = json.loads((run_dir / "eval" / "step_000000002" / "eval.json").read_text())
    assert first_eval["step"] == 2 and first_eval["eval_overall"] == report["overall"]
    assert len(report["items"]) == len(report["per_category"]) >= 4  # one prompt per category
    assert all(f"eval/{c}" in first_eval for c in report["per_category"])
    # the preemption: both ranks stopped at one step, after the evaluation, and saved it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] and summary["saved_step"] == summary["step"] >= 2
    # the stream counters: rank 0's, and the sum over both ranks (each reads its own shards)
    assert summary["stream_all_ranks"]["samples_read"] > summary["stream"]["samples_read"] > 0
    ck = run_dir / "checkpoints" / f"step_{summary['step']:09d}"
    assert (ck / "COMPLETE").exists() and (ck / "rank_00001.json").exists()
