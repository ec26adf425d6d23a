"""Stage clock (step and token stages, resumable) + one LR schedule over stages; the FLOP model behind the MFU estimate."""

import pytest

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
    assert ran == [0] * 10 + [1] * 7 and clock.finished and clock.start_step == 17


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
    assert all(isinstance(v, (int, float, str, list)) for v in vars(clock).values())  # plain


def test_flops_match_parameter_count_and_packed_attention():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    llm = Qwen3ForCausalLM(c)
    matmul_params = sum(p.numel() for n, p in llm.model.layers.named_parameters() if p.dim() == 2)
    fm = FlopModel.from_model(c, head_params=1000, head_repeat=2)
    assert fm.dense_per_token == 2 * matmul_params
    one = fm.train_flops([64], text_tokens=0, image_tokens=0)
    two = fm.train_flops([32, 32], text_tokens=0, image_tokens=0)
    # same tokens, but packed samples attend only inside themselves: less attention work
    attn_one = one - 3 * fm.dense_per_token * 64
    attn_two = two - 3 * fm.dense_per_token * 64
    assert attn_one == pytest.approx(3 * 4 * 3 * 4 * 8 * 64 * 65 / 2)
    assert attn_two == pytest.approx(2 * 3 * 4 * 3 * 4 * 8 * 32 * 33 / 2)
    assert fm.train_flops([64], 5, 16) - one == pytest.approx(3 * (2 * 32 * 100 * 5 + 2 * 1000 * 2 * 16))
