import math

import pytest
import torch

from bdt.training.deepspeed_config import DeepSpeedConfig, OptimConfig, build_ds_config
from bdt.training.schedule import ConfigLR, WarmupSchedule


def test_warmup_then_cosine_reaches_floor():
    s = WarmupSchedule(warmup_steps=4, total_steps=14, kind="cosine", min_ratio=0.1)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s(4) == pytest.approx(1.0)
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)
    values = [s(i) for i in range(4, 15)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # a stage counted in tokens asks at fractional positions: once 1.44x the peak at 1.875 of 2
    assert WarmupSchedule(2, 10)(1.875) == 1.0 and WarmupSchedule(2, 10)(0.5) == 0.75


def test_constant_and_bad_kind():
    s = WarmupSchedule(warmup_steps=2, total_steps=10, kind="constant")
    assert [s(i) for i in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="optim.schedule"):
        WarmupSchedule(2, 10, kind="linear")


def _trained(lr=2.0, schedule=WarmupSchedule(3, 10, "cosine", 0.0), steps=5, scheduler=ConfigLR):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler(opt, schedule)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt, sched


def _resumed(opt_state, sched_state, lr, schedule):
    """A fresh optimizer + ConfigLR loaded in DeepSpeed's ZeRO-1/2 order: the scheduler, then the
    optimizer (its param groups carry the saved LR), then write_lrs()."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = ConfigLR(opt, schedule)
    sched.load_state_dict(sched_state)
    opt.load_state_dict(opt_state)
    saved_lr = opt.param_groups[0]["lr"]
    sched.write_lrs()
    return opt, sched, saved_lr


def test_config_lr_saves_the_position_only_and_resumes_bitwise():
    opt, sched = _trained()
    assert sched.state_dict() == {"last_epoch": 5}
    opt2, sched2, _ = _resumed(opt.state_dict(), sched.state_dict(), 2.0,
                               WarmupSchedule(3, 10, "cosine", 0.0))
    for _ in range(3):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        for o, s in ((opt, sched), (opt2, sched2)):
            o.step()
            s.step()
    assert opt2.param_groups[0]["lr"] == 2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 7))


def test_config_lr_resumes_with_the_configs_lr_and_schedule():
    """The LR of the first resumed step is the config's at the saved position, not the LR the
    checkpoint's optimizer state holds; so are the later ones."""
    opt, sched = _trained()
    longer = WarmupSchedule(3, 20, "cosine", 0.0)
    opt2, sched2, saved_lr = _resumed(opt.state_dict(), sched.state_dict(), 4.0, longer)
    assert saved_lr == opt.param_groups[0]["lr"] != 4.0 * longer(5)
    assert opt2.param_groups[0]["lr"] == sched2.get_last_lr()[0] == 4.0 * longer(5)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == 4.0 * longer(6)


def test_config_lr_resumes_with_the_configs_betas_eps_and_weight_decay():
    """A resume with optim.beta1/beta2/eps/weight_decay edited runs with the config's values: the
    loaded optimizer state brings back the saved ones (the old weight decay was used without a
    word); Adam's moments and step count stay the checkpoint's."""
    weight = torch.nn.Parameter(torch.ones(2))
    saved = torch.optim.AdamW([weight], lr=1.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    weight.sum().backward()
    saved.step()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1.0, betas=(0.5, 0.6),
                            eps=1e-6, weight_decay=0.0)
    sched = ConfigLR(opt, WarmupSchedule(0, 10, "constant"))
    opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["weight_decay"] == 0.1  # DeepSpeed's load, before write_lrs
    sched.write_lrs()
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.5, 0.6), 1e-6, 0.0)
    assert int(opt.state[group["params"][0]]["step"]) == 1


def test_config_lr_reads_the_lambda_lr_state_of_earlier_checkpoints():
    """Checkpoints written before ConfigLR hold LambdaLR's state (base LRs, the schedule's
    fields, the last LR): only its position is taken."""
    opt, sched = _trained(scheduler=torch.optim.lr_scheduler.LambdaLR)
    state = sched.state_dict()
    assert state["last_epoch"] == 5 and state["lr_lambdas"][0]["total_steps"] == 10
    constant = WarmupSchedule(1, 10, "constant")
    opt2, sched2, _ = _resumed(opt.state_dict(), state, 0.5, constant)
    assert sched2.last_epoch == 5 and sched2.base_lrs == [0.5] and sched2.multiplier is constant
    assert opt2.param_groups[0]["lr"] == 0.5


def test_bf16_at_zero_0_is_refused():
    """DeepSpeed's ZeRO-0 bf16 optimizer stepped AdamW on zero gradients when it was built: the
    AR trainer's fp32 master weights lost 10% (weight_decay 0.1 at its base LR 1.0) before the
    first step, and Adam's first update was 0.74 of its size."""
    with pytest.raises(ValueError, match=r"deepspeed.precision=bf16 needs deepspeed.zero_stage "
                                         r"1-3: DeepSpeed's ZeRO-0 bf16 optimizer steps AdamW"):
        build_ds_config(DeepSpeedConfig(zero_stage=0, precision="bf16"), OptimConfig(), 1)
    assert build_ds_config(DeepSpeedConfig(zero_stage=1, precision="bf16"), OptimConfig(), 1)


@pytest.mark.parametrize("extra, key, field", [
    ({"gradient_accumulation_steps": 4}, "extra.gradient_accumulation_steps", "grad_accum"),
    ({"bf16": {"enabled": True}}, "extra.bf16", "precision"),
    ({"fp16": {"enabled": True}}, "extra.fp16", "precision"),
    ({"zero_optimization": {"stage": 3}}, "extra.zero_optimization.stage", "zero_stage")])
def test_extra_keys_that_a_typed_field_sets_are_refused(extra, key, field):
    """They went past the typed checks: extra bf16 trained at ZeRO-0 (refused above) with the
    checkpoint recording fp32; an extra ZeRO-3 with an EMA crashed in its first update."""
    with pytest.raises(ValueError, match=rf"deepspeed.{key}: set deepspeed.{field} instead"):
        build_ds_config(DeepSpeedConfig(extra=extra), OptimConfig(), 1)


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


def test_torch_adam_on_a_gpu_too_unless_the_optimizer_is_offloaded(monkeypatch):
    """On CUDA, DeepSpeed's FusedAdam JIT-builds a CUDA extension at start, which a machine
    without a CUDA compiler cannot: torch's AdamW there as on a CPU. An optimizer offloaded to
    the CPU stays DeepSpeed's CPUAdam, the only one DeepSpeed accepts for it."""
    import bdt.training.deepspeed_config as dsc

    monkeypatch.setattr(dsc.torch.cuda, "is_available", lambda: True)
    assert build_ds_config(DeepSpeedConfig(zero_stage=2), OptimConfig(), 1)[
        "optimizer"]["params"]["torch_adam"] is True
    offloaded = DeepSpeedConfig(zero_stage=2, extra={"zero_optimization": {
        "offload_optimizer": {"device": "cpu", "pin_memory": True}}})
    assert "torch_adam" not in build_ds_config(offloaded, OptimConfig(), 1)["optimizer"]["params"]
    chosen = DeepSpeedConfig(extra={"optimizer": {"params": {"torch_adam": False}}})
    assert build_ds_config(chosen, OptimConfig(), 1)["optimizer"]["params"]["torch_adam"] is False
