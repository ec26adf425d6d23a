"""FLOP counting for MFU: block-causal attention pairs, the diffusion head, the packed row."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bdt.model.attention_masks import BlockCausalLayout
from bdt.model.head import HeadConfig
from bdt.training.ar.flops import FlopModel, head_flops_per_token, visible_pairs


@pytest.mark.parametrize("n, causal, P", [(29, 5, 4), (64, 64, 1), (300, 40, 16), (10, 3, 3),
                                           (7, 7, 4)])
def test_visible_pairs_are_the_masks(n, causal, P):
    mask = BlockCausalLayout.from_packed([0, n], [causal], P).visible()
    assert visible_pairs(n, causal, P) == int(mask.sum())


def test_packed_row_counts_block_causal_pairs():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    c = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    fm = FlopModel.from_model(Qwen3ForCausalLM(c), head_params=0, head_repeat=1)
    layout = BlockCausalLayout.from_packed([0, 29, 329], [5, 40], [4, 16])
    block = fm.train_flops([29, 300], 0, 0, causal_lens=[5, 40], block_sizes=[4, 16])
    causal = fm.train_flops([29, 300], 0, 0)
    assert block - causal == pytest.approx(
        3 * fm.attn_coef * (int(layout.visible().sum()) - (29 * 30 + 300 * 301) // 2))


def test_for_model_counts_head_repeats_and_connector():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bdt.model.ar import BitDanceModel
    from bdt.model.config import ModelConfig

    llm = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=8))
    cfg = ModelConfig(head=HeadConfig(width=64, depth=2, num_adaln_sets=2, head_dim=32, bits=8,
                                      repeat=2), parallel_num=4, attn_backend="sdpa")
    model = BitDanceModel(cfg, llm)
    x, t, c = torch.zeros(3, 4, 8), torch.zeros(3), torch.zeros(3, 4, 32)
    with FlopCounterMode(display=False) as counted:
        model.head(x, t, c)
    connector = sum(p.numel() for p in model.connector.parameters())
    fm = FlopModel.for_model(model)
    # (rel: torch counts the P x P attention of the meta copy and of the real head differently)
    head = head_flops_per_token(model.head.cfg) * 2
    assert head == pytest.approx(2 * counted.get_total_flops() / 12, rel=0.01)
    # exact: the connector is 0.5% of the total here, inside that tolerance
    assert fm.head_per_image == head + 2 * connector
    assert fm.dense_per_token == FlopModel.from_model(llm, 0, 1).dense_per_token


def _llm(name: str, **fields):
    import transformers

    config = getattr(transformers, name + "Config")(vocab_size=100, **fields)
    return transformers.AutoModelForCausalLM.from_config(config)


# Decoder weights per layer, by hand: d = 32, 4 heads of 8, I = the MLP's width.
LLAMA = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48  # q, GQA k and v (2 heads), o; gate, up, down
GPT2 = 32 * 96 + 32 * 32 + 2 * 32 * 128  # fused qkv, o; fc, proj (no intermediate_size: 4 x d)
FALCON = 32 * 48 + 32 * 32 + 2 * 32 * 128  # multi-query: q and one k, v head fused, o; 2 x 4d
STARCODER2 = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 2 * 32 * 48
MIXTRAL = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 2 * 3 * 32 * 48  # 2 of the 4 experts (no router)


@pytest.mark.parametrize("name, fields, per_layer", [
    ("Llama", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2), LLAMA),
    ("GPT2", dict(n_embd=32, n_layer=3, n_head=4), GPT2),
    ("Falcon", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4), FALCON),
    ("Starcoder2", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2), STARCODER2),
    ("Mixtral", dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                     num_experts_per_tok=2), MIXTRAL),
])
def test_decoder_flops_count_the_mlp_the_backbone_has(name, fields, per_layer):
    """Every MLP was counted as 3 matrices (SwiGLU) of intermediate_size (or 4 x hidden): GPT-2's,
    Falcon's and Starcoder2's 2 matrices were a third too high, Falcon's one key/value head
    counted as 4, and MoE experts as one dense MLP."""
    fm = FlopModel.from_model(_llm(name, **fields), head_params=0, head_repeat=1)
    assert fm.dense_per_token == 2 * 3 * per_layer
    assert fm.attn_coef == 4 * 3 * 4 * 8
