import math

import pytest
import torch

from bdt.training.deepspeed_config import DeepSpeedConfig, OptimConfig, build_ds_config
from bdt.training.schedule import WarmupSchedule, lambda_lr


def test_warmup_then_cosine_reaches_floor():
    s = WarmupSchedule(warmup_steps=4, total_steps=14, kind="cosine", min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    values = [s(i) for i in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_and_bad_kind():
    s = WarmupSchedule(warmup_steps=2, total_steps=10, kind="constant")
    assert [s(i) for i in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="optim.schedule"):
        WarmupSchedule(2, 10, kind="linear")


def test_lambda_lr_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = lambda_lr(opt, WarmupSchedule(3, 10, "cosine", 0.0))
    for _ in range(5):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched2 = lambda_lr(opt2, WarmupSchedule(3, 10, "cosine", 0.0))
    # As in a checkpoint: the optimizer state carries the current lr, the scheduler its step.
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 5
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    sched.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_ds_config_from_typed_config():
    ds = DeepSpeedConfig(zero_stage=2, precision="bf16", micro_batch_size=4, grad_accum=3,
                         extra={"zero_optimization": {"overlap_comm": False}, "foo": 1})
    cfg = build_ds_config(ds, OptimConfig(lr=3e-4, grad_clip=0.5), world_size=2)
    assert cfg["train_batch_size"] == 24
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert cfg["bf16"]["enabled"] is True and cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["foo"] == 1
    assert "gradient_clipping" not in build_ds_config(DeepSpeedConfig(), OptimConfig(grad_clip=0), 1)
    with pytest.raises(ValueError, match="zero_stage"):
        build_ds_config(DeepSpeedConfig(zero_stage=4), OptimConfig(), 1)
    with pytest.raises(ValueError, match="precision"):
        build_ds_config(DeepSpeedConfig(precision="fp16"), OptimConfig(), 1)
