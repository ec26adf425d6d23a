"""Stage plan + one LR schedule over stages; the FLOP model behind the MFU estimate."""

import pytest

from bdt.trainer.flops import FlopModel
from bdt.trainer.stages import StagedLR, StagePlan
from bdt.trainer.train_config import StageConfig


def stages():
    return [StageConfig(name="256", shards="x", steps=10, lr=1e-3, warmup_steps=4, schedule="constant"),
            StageConfig(name="512", shards="x", tokens=4096 * 2 * 2 * 5 + 1, token_budget=4096,
                        lr=2e-4, warmup_steps=2, schedule="cosine", min_lr_ratio=0.5)]


def test_plan_boundaries_and_token_length():
    plan = StagePlan.build(stages(), grad_accum=2, world_size=2)
    # 5 steps of 2 x 2 x 4096 budgeted tokens fall 1 token short: 6 steps
    assert plan.starts == [0, 10] and plan.ends == [10, 16] and plan.total_steps == 16
    assert [plan.stage_of(s) for s in (0, 9, 10, 15)] == [0, 0, 1, 1]


def test_lr_warms_up_again_in_each_stage():
    plan = StagePlan.build(stages(), grad_accum=2, world_size=2)
    lr = StagedLR(stages(), plan)
    assert [lr(s) for s in (0, 3, 9)] == pytest.approx([2.5e-4, 1e-3, 1e-3])
    assert lr(10) == pytest.approx(1e-4)  # stage 2, warmup step 1 of 2
    assert lr(11) == pytest.approx(2e-4)
    assert lr(15) < lr(12) and lr(15) >= 2e-4 * 0.5  # cosine to its floor
    assert all(isinstance(v, (int, float, str)) for spec in lr.specs for v in spec)  # checkpointable


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
