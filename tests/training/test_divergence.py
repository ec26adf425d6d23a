"""A non-finite loss or gradient norm on any rank stops every rank at the same step, before a save
(bdt.training.divergence). The trainers' end-to-end cases are in ar/test_train.py and
tokenizer/test_tokenizer_train.py."""

import os
import signal

import pytest
import torch
import torch.distributed as tdist

from bdt.training.distributed import free_port
from bdt.training.divergence import StepHealth, TrainingDiverged, raise_diverged
from bdt.training.signals import DIVERGED, StopFlag
from trainutil import loopback_gloo_group, rank_entry, spawn_ranks


def test_step_health_keeps_the_first_problem_and_quotes_the_samples():
    health = StepHealth()
    health.check_losses({"loss": 1.5, "vision": 2.0}, "micro-batch 0", ["a"])
    health.check_grad_norm(3.0)
    assert not health.bad
    keys = [f"k{i}" for i in range(11)]
    health.check_losses({"loss": float("nan"), "vision": float("inf")}, "micro-batch 1", keys)
    health.check_losses({"loss": float("nan")}, "micro-batch 2", ["later"])
    health.check_grad_norm(float("inf"))
    assert health.problem == ("micro-batch 1: loss=nan, vision=inf, samples k0, k1, k2, k3, k4, "
                              "k5, k6, k7 and 3 more")
    health.reset()
    health.check_grad_norm(float("nan"))
    assert health.problem == "gradient norm nan after a finite loss"


def test_a_lone_process_raises_with_its_report_and_the_last_checkpoint():
    health = StepHealth()
    health.check_losses({"loss": float("-inf")}, "micro-batch 0")
    flag = StopFlag()
    try:
        assert flag.should_stop(torch.device("cpu"), diverged=health.bad) == DIVERGED
    finally:
        flag.restore()
    with pytest.raises(TrainingDiverged, match=r"at step 7: non-finite values \(rank 0: "
                       r"micro-batch 0: loss=-inf\)\. .*newest checkpoint is step 5\. fix it"):
        raise_diverged(health, 7, 5, "fix it")
    with pytest.raises(TrainingDiverged, match="no checkpoint was written"):
        raise_diverged(health, 1, -1, "")


@rank_entry
def _rank(rank: int, world: int, port: int, out: str) -> None:
    loopback_gloo_group(rank, world, port)
    flag = StopFlag()
    try:
        health = StepHealth()
        cpu = torch.device("cpu")
        # Step 1: all finite; step 2: only rank 1's loss is NaN, and rank 0 got a stop signal,
        # which must not make rank 0 save a step that diverged elsewhere.
        assert flag.should_stop(cpu, diverged=health.bad) == 0
        if rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag.requested
        health.check_losses({"loss": float("nan") if rank == 1 else 0.5}, "micro-batch 0",
                            [f"r{rank}"])
        why = flag.should_stop(cpu, diverged=health.bad)
        try:
            raise_diverged(health, 2, -1, "")
        except TrainingDiverged as e:
            message = str(e)
        with open(os.path.join(out, f"rank{rank}"), "w") as f:
            f.write(f"{why}\n{message}")
    finally:
        flag.restore()
        tdist.destroy_process_group()


@pytest.mark.slow
def test_one_ranks_nan_stops_every_rank_at_the_same_step(tmp_path):
    spawn_ranks(_rank, (2, free_port(), str(tmp_path)), 2)
    for rank in (0, 1):
        why, message = (tmp_path / f"rank{rank}").read_text().split("\n", 1)
        assert int(why) == DIVERGED
        assert "(rank 1: micro-batch 0: loss=nan, samples r1)" in message
        assert "rank 0:" not in message
