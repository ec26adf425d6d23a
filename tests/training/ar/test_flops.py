"""FLOP counting for MFU: block-causal attention pairs, the diffusion head, the packed row."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bdt.model.attention import BlockCausalLayout
from bdt.model.head import HeadConfig
from bdt.training.ar.flops import FlopModel, visible_pairs


@pytest.mark.parametrize("n, causal, P", [(29, 5, 4), (64, 64, 1), (300, 40, 16), (10, 3, 3),
                                           (7, 7, 4)])
def test_visible_pairs_are_the_masks(n, causal, P):
    mask = BlockCausalLayout.from_packed([0, n], [causal], P).visible()
    assert visible_pairs(n, causal, P) == int(mask.sum())


def test_packed_row_counts_block_causal_pairs():
    from transformers import Qwen3Config

    c = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    fm = FlopModel.from_model(c, head_params=0, head_repeat=1)
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
    assert fm.head_per_image == pytest.approx(2 * counted.get_total_flops() / 12 + 2 * connector,
                                              rel=0.01)
    assert fm.dense_per_token == FlopModel.from_model(llm.config, 0, 1).dense_per_token


def test_configs_without_intermediate_size_count_a_4x_mlp():
    """GPT-2 and Falcon configs name no intermediate_size: the trainer failed at start
    with an AttributeError traceback from this MFU estimate."""
    from transformers import GPT2Config, LlamaConfig

    gpt2 = GPT2Config(vocab_size=100, n_embd=32, n_layer=3, n_head=4)
    llama = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4)
    assert (FlopModel.from_model(gpt2, 0, 1).dense_per_token
            == FlopModel.from_model(llama, 0, 1).dense_per_token)
