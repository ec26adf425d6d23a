import json
import logging
import os
import signal
from types import SimpleNamespace

import torch

from bdt.training.metrics import MetricsLogger, Throughput
from bdt.training.signals import StopFlag


def test_sigterm_and_sigusr1_set_the_stop_flag():
    # Whatever handler was installed before (SIG_DFL, or one from ray.init earlier in this
    # pytest process) must be back afterwards.
    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        flag = StopFlag()
        try:
            assert not flag.should_stop(torch.device("cpu"))
            os.kill(os.getpid(), sig)
            assert flag.should_stop(torch.device("cpu")) and flag.signum == sig
        finally:
            flag.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_metrics_logger_jsonl_tensorboard_and_log(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bdt")
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=True)
    log.log(3, {"loss": 0.5, "bit_rate/000": 0.25, "name": "ignored"})
    log.close()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec["step"] == 3 and rec["loss"] == 0.5 and rec["bit_rate/000"] == 0.25 and "name" not in rec
    assert "step 3 loss=0.5" in caplog.text and "bit_rate" not in caplog.text
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    MetricsLogger(str(tmp_path / "off"), enabled=False).log(1, {"loss": 1.0})
    assert not os.path.exists(tmp_path / "off")


def test_a_record_cut_by_a_kill_is_dropped_on_reopen(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    log = MetricsLogger(str(tmp_path), enabled=True, tensorboard=False)
    log.log(2, {"loss": 1.5})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 2.0), (2, 1.5)]


def test_throughput_rates(monkeypatch):
    """On a clock the test moves: with the real one only ratios could be checked, and a wrong
    elapsed time (negative, or a clock read twice) gave rates that passed."""
    import bdt.training.metrics as metrics

    now = [100.0]
    monkeypatch.setattr(metrics, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    t = Throughput()
    now[0] = 102.0
    t.add_step(items=8, tokens=512)
    t.add_data_wait(0.5)
    now[0] = 104.0
    t.add_step(items=8, tokens=512)
    assert t.report(world_size=2) == {
        "step_time_s": 2.0, "data_wait_frac": 0.125, "items_per_s_rank": 4.0, "items_per_s": 8.0,
        "tokens_per_s_rank": 256.0, "tokens_per_s": 512.0}
    assert t.steps == 0  # reset after a report, its clock too
    now[0] = 105.0
    t.add_step(items=3)
    assert t.report() == {"step_time_s": 1.0, "data_wait_frac": 0.0, "items_per_s_rank": 3.0,
                          "items_per_s": 3.0}
