"""Stage clock (step and token stages, resumable) + one LR schedule over stages; the FLOP model behind the MFU estimate."""

import pytest
import torch

from bdt.training.ar.flops import FlopModel
from bdt.training.ar.stages import StageClock
from bdt.training.ar.config import StageConfig

BUDGET_STEP = 4096 * 2 * 2  # token_budget x grad_accum x ranks


def stages():
    return [StageConfig(name="256", shards="x", steps=10, lr=1e-3, warmup_steps=4, schedule="constant"),
            StageConfig(name="512", shards="x", tokens=BUDGET_STEP * 5 + 1, token_budget=4096,
                        lr=2e-4, warmup_steps=2, schedule="cosine", min_lr_ratio=0.5)]


def run_clock(clock, step_tokens, first_step=0):
    """Drive the clock as the loop does from global step `first_step`: per step, add its
    tokens, then maybe advance. Returns the stage of every step that ran."""
    ran, step = [], first_step
    for tokens in step_tokens[first_step:]:
        if clock.finished:
            break
        ran.append(clock.stage)
        clock.add_tokens(tokens)
        if clock.stage_done(step + 1):
            clock.advance(step + 1)
        step += 1
    return ran


def test_step_stage_then_token_stage_ends_on_real_tokens():
    clock = StageClock(stages(), grad_accum=2, world_size=2)
    # 80% real tokens per step: the token stage needs 6 steps at the full budget, 7 here
    ran = run_clock(clock, [int(BUDGET_STEP * 0.8)] * 30)
    # finished, with the last stage's position kept (a resume may lengthen it)
    assert ran == [0] * 10 + [1] * 7 and clock.finished and clock.start_step == 10


def test_a_resume_applies_changed_stage_lengths_before_any_step():
    """A finished run resumed with a longer last stage once trained nothing (and re-exported);
    a stage shortened below what had run trained one more step at its floor LR."""
    done = StageClock(stages(), grad_accum=2, world_size=2)
    run_clock(done, [BUDGET_STEP] * 30)
    assert done.finished
    longer = stages()
    longer[1].tokens *= 2
    again = StageClock(longer, grad_accum=2, world_size=2)
    again.load_state_dict(done.state_dict())
    again.resume_at(16)
    assert again.stage == 1 and not again.finished and again.start_step == 10
    same = StageClock(stages(), grad_accum=2, world_size=2)
    same.load_state_dict(done.state_dict())
    same.resume_at(16)
    assert same.finished  # nothing more to train
    old = StageClock(longer, grad_accum=2, world_size=2)  # a clock saved before kept_last
    old.load_state_dict({k: v for k, v in done.state_dict().items() if k != "kept_last"})
    old.resume_at(16)
    assert old.finished
    mid = StageClock(stages(), grad_accum=2, world_size=2)
    run_clock(mid, [BUDGET_STEP] * 6)  # 6 steps into the 10-step first stage
    shorter = stages()
    shorter[0].steps = 4
    cut = StageClock(shorter, grad_accum=2, world_size=2)
    cut.load_state_dict(mid.state_dict())
    cut.resume_at(6)
    assert cut.stage == 1 and cut.start_step == 6  # the next stage begins, no step at stage 0


def test_a_resume_at_a_stage_switch_goes_back_into_the_stage_lengthened_since():
    """The checkpoint of the step that ended stage 0 holds its stream: resumed with stage 0
    lengthened, it trains stage 0 on to its new end at its schedule's LR, as the checkpoint a
    step earlier does and as a run with that plan from the start did (once it stayed in stage 1)."""
    longer = stages()
    longer[0].steps = 12
    tokens = [BUDGET_STEP] * 30
    whole = StageClock(longer, grad_accum=2, world_size=2)
    lrs = [whole(0)]
    for step in range(18):
        run_clock(whole, tokens[:step + 1], first_step=step)
        lrs.append(whole(step + 1))
    for saved_at in (9, 10):  # just before the switch, and at it
        saved = StageClock(stages(), grad_accum=2, world_size=2)
        run_clock(saved, tokens[:saved_at])
        resumed = StageClock(longer, grad_accum=2, world_size=2)
        resumed.load_state_dict(saved.state_dict())
        resumed.resume_at(saved_at)
        assert resumed(saved_at) == lrs[saved_at]
        assert run_clock(resumed, tokens, first_step=saved_at) == [0] * (12 - saved_at) + [1] * 6
    same = StageClock(stages(), grad_accum=2, world_size=2)
    same.load_state_dict(saved.state_dict())
    same.resume_at(10)
    assert same.stage == 1 and same.start_step == 10  # not lengthened: stage 1 goes on


def test_a_finished_run_resumed_with_a_stage_appended_trains_all_of_it():
    """The finished clock keeps the last stage's start and tokens: resumed with a stage
    appended, the new stage took them for its own, began at the old last stage's start and
    ended at once (or too early), its schedule shifted."""
    appended = stages() + [StageConfig(name="1024", shards="x", steps=5, lr=1e-4,
                                       warmup_steps=2, schedule="constant")]
    whole = StageClock(appended, grad_accum=2, world_size=2)
    ran_whole = run_clock(whole, [BUDGET_STEP] * 30)
    done = StageClock(stages(), grad_accum=2, world_size=2)
    run_clock(done, [BUDGET_STEP] * 30)
    resumed = StageClock(appended, grad_accum=2, world_size=2)
    resumed.load_state_dict(done.state_dict())
    resumed.resume_at(16)
    assert resumed.stage == 2 and resumed.start_step == 16 and resumed.stage_tokens == 0
    assert run_clock(resumed, [BUDGET_STEP] * 30, first_step=16) == ran_whole[16:] == [2] * 5


def test_a_resume_refuses_stages_renamed_or_reordered_before_the_current_one():
    """The checkpoint names its stage by index: a stage inserted in front would have resumed
    into the wrong plan; later stages may still change, and old checkpoints carry no names."""
    mid = StageClock(stages(), grad_accum=2, world_size=2)
    run_clock(mid, [BUDGET_STEP] * 12)  # in stage 1 ("512")
    swapped = stages()[::-1]
    with pytest.raises(ValueError, match=r"stages so far are \['256', '512'\], the config's "
                                         r"first 2 are \['512', '256'\]"):
        StageClock(swapped, grad_accum=2, world_size=2).load_state_dict(mid.state_dict())
    early = StageClock(stages(), grad_accum=2, world_size=2)
    run_clock(early, [BUDGET_STEP] * 3)  # still in stage 0: stage 1 may be renamed
    renamed = stages()
    renamed[1].name = "1024"
    StageClock(renamed, grad_accum=2, world_size=2).load_state_dict(early.state_dict())
    legacy = {k: v for k, v in mid.state_dict().items() if k != "names"}
    StageClock(swapped, grad_accum=2, world_size=2).load_state_dict(legacy)


def test_clock_state_resumes_mid_token_stage():
    tokens = [BUDGET_STEP // 2 + 7 * i for i in range(40)]
    whole = run_clock(StageClock(stages(), grad_accum=2, world_size=2), tokens)
    first = StageClock(stages(), grad_accum=2, world_size=2)
    ran = run_clock(first, tokens[:13])
    assert first.stage == 1 and 0 < first.stage_tokens  # interrupted inside the token stage
    resumed = StageClock(stages(), grad_accum=2, world_size=2)
    resumed.load_state_dict(first.state_dict())
    assert ran + run_clock(resumed, tokens, first_step=13) == whole
    with pytest.raises(ValueError, match="stage 5, the config has only 2"):
        resumed.load_state_dict({"stage": 5, "start_step": 0, "stage_tokens": 0})


def test_lr_warms_up_again_in_each_stage_token_stage_in_budgets():
    clock = StageClock(stages(), grad_accum=2, world_size=2)
    assert [clock(s) for s in (0, 3, 9)] == pytest.approx([2.5e-4, 1e-3, 1e-3])
    run_clock(clock, [BUDGET_STEP] * 10)  # into the token stage, nothing consumed yet
    assert clock.stage == 1 and clock(10) == pytest.approx(1e-4)  # warmup budget 1 of 2
    clock.add_tokens(BUDGET_STEP)
    assert clock(11) == pytest.approx(2e-4)
    clock.add_tokens(3 * BUDGET_STEP)
    late = clock(14)
    assert 2e-4 * 0.5 <= late < 2e-4  # cosine over the stage's tokens, toward its floor
    clock.add_tokens(BUDGET_STEP // 2)  # the position is tokens, not steps: same step, lower LR
    assert clock(14) < late
    plain = (int, float, str, list, dict, type(None))
    assert all(isinstance(v, plain) for v in vars(clock).values())


def cosine_stages():
    return [StageConfig(name="a", shards="x", steps=4, lr=1e-3, warmup_steps=1, schedule="constant"),
            StageConfig(name="b", shards="x", steps=1000, lr=1e-3, warmup_steps=2,
                        schedule="cosine", min_lr_ratio=0.1)]


def test_fit_shortens_the_stage_and_its_decay_and_survives_resume():
    clock = StageClock(cosine_stages(), grad_accum=1, world_size=1)
    run_clock(clock, [1] * 24)  # stage "b" has run 20 steps
    assert clock.stage == 1 and clock(24) > 0.99e-3
    assert not clock.fit(24, 980) and not clock.fit(24, 5000)  # never lengthens
    assert clock.fitted is None
    assert clock.fit(24, 30)  # 50 steps in all
    saved = clock.state_dict()
    resumed = StageClock(cosine_stages(), grad_accum=1, world_size=1)
    resumed.load_state_dict(saved)
    for c in (clock, resumed):
        lrs = [c(s) for s in range(24, 54)]
        assert run_clock(c, [1] * 54, first_step=24) == [1] * 30 and c.finished
        assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(1e-4, rel=0.01)
    # a config resumed with a shorter stage than the fit keeps its own length
    short = cosine_stages()
    short[1].steps = 40
    shorter = StageClock(short, grad_accum=1, world_size=1)
    shorter.load_state_dict(saved)
    assert shorter.fitted["steps"] == 40
    with pytest.raises(ValueError, match="fitted stage 7"):
        shorter.load_state_dict({**saved, "fitted": {**saved["fitted"], "stage": 7}})


def test_fit_of_a_token_stage_keeps_its_tokens_per_step():
    clock = StageClock(stages(), grad_accum=2, world_size=2)
    run_clock(clock, [BUDGET_STEP // 2] * 12)  # 2 steps into the token stage, half budgets
    assert clock.fit(12, 3)  # 3 more steps at half a budget each: 2.5 budgets in all
    assert clock.token_limits[1] == BUDGET_STEP // 2 * 5 and clock.specs[1][2] == 3
    assert run_clock(clock, [BUDGET_STEP // 2] * 20, first_step=12) == [1] * 3 and clock.finished


def test_time_fit_measures_once_and_leaves_the_limit_room():
    from bdt.training.ar.time_fit import CALIBRATION_STEPS, WARMUP_STEPS, TimeFit

    t = [0.0]  # the budget began 10 s before the first step (the demo counts its install)
    clock = StageClock(cosine_stages(), grad_accum=1, world_size=1)
    fit = TimeFit(0.5, limit_min=1.0, started=-10.0, clock=clock, now=lambda: t[0])
    decided, step = [], 0
    while not clock.finished:  # 0.2 s per step
        run_clock(clock, [1] * (step + 1), first_step=step)
        step += 1
        t[0] += 0.2
        out = fit.after_step(clock, step, torch.device("cpu"))
        if out:
            decided.append((step, out))
    [(at, out)] = decided
    assert at == 4 + WARMUP_STEPS + CALIBRATION_STEPS  # counted in the last stage only
    assert out["time_fit/step_s"] == pytest.approx(0.2)
    assert out["time_fit/left_s"] == pytest.approx(50 - 0.2 * at)
    assert out["time_fit/steps_left"] == int(0.5 * (50 - 0.2 * at) / 0.2)
    assert step == at + out["time_fit/steps_left"]  # ended where the fit said
    assert t[0] + 10.0 < 60 * 0.8
    # a run that fits as configured is measured and left alone; without a fit, nothing runs
    for fraction, limit, measured in ((1.0, 1000.0, 1), (0.0, 1.0, 0)):
        clock = StageClock(cosine_stages(), grad_accum=1, world_size=1)
        fit = TimeFit(fraction, limit_min=limit, started=0.0, clock=clock, now=lambda: t[0])
        outs = []
        for step in range(1, 200):
            run_clock(clock, [1] * step, first_step=step - 1)
            t[0] += 0.2
            outs += [o for o in [fit.after_step(clock, step, torch.device("cpu"))] if o]
        assert len(outs) == measured and clock.fitted is None
        assert all(o["time_fit/shortened"] == 0.0 for o in outs)


def test_flops_match_parameter_count_and_packed_attention():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    llm = Qwen3ForCausalLM(c)
    matmul_params = sum(p.numel() for n, p in llm.model.layers.named_parameters() if p.dim() == 2)
    fm = FlopModel.from_model(llm, head_params=1000, head_repeat=2)
    assert fm.dense_per_token == 2 * matmul_params
    one = fm.train_flops([64], text_tokens=0, image_tokens=0)
    two = fm.train_flops([32, 32], text_tokens=0, image_tokens=0)
    # same tokens, but packed samples attend only inside themselves: less attention work
    attn_one = one - 3 * fm.dense_per_token * 64
    attn_two = two - 3 * fm.dense_per_token * 64
    assert attn_one == pytest.approx(3 * 4 * 3 * 4 * 8 * 64 * 65 / 2)
    assert attn_two == pytest.approx(2 * 3 * 4 * 3 * 4 * 8 * 32 * 33 / 2)
    assert fm.train_flops([64], 5, 16) - one == pytest.approx(3 * (2 * 32 * 100 * 5 + 2 * 1000 * 2 * 16))
