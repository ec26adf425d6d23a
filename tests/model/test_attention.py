"""Attention facade: fixture masks, backends agree inside a tiny Qwen3, packing, KV decoding."""

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention
from transformers import DynamicCache, Qwen3Config, Qwen3Model

from bdt.model.attention import (BlockCausalLayout, attention_kwargs, decode_attention_mask,
                                 hf_attn_implementation, left_padded_layout, resolve_backend)

from reference import REF

# Uncompiled flex is intended here (see eager_flex); torch warns about it once.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
PACKED = dict(cu_seqlens=[0, 17, 29], causal_lens=[5, 4], block_sizes=[4, 4])


@pytest.fixture(scope="module")
def qwen3() -> Qwen3Model:
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64)
    return Qwen3Model(cfg).eval()


def run(model, x, backend, layout, **extra):
    model.set_attn_implementation(hf_attn_implementation(backend))
    with torch.no_grad():
        return model(inputs_embeds=x, use_cache=False,
                     **attention_kwargs(layout, backend), **extra).last_hidden_state


@pytest.fixture
def eager_flex(monkeypatch):
    """HF's flex path with flex_attention uncompiled: the compile costs 50-80 s on this CPU
    (environment.md); the kernel semantics and our BlockMask are the same."""
    import transformers.integrations.flex_attention as hf_flex

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kw: flex_attention(q, k, v, **kw))


def test_masks_equal_sequence_tiny_fixture():
    examples = json.loads((REF / "sequence_tiny.json").read_text())["attention_mask"]["examples"]
    # causal_len = text + <|vision_start|> + <|res_h|>; then blocks of P from <|res_w|> on.
    one = BlockCausalLayout.from_packed([0, 26], [4 + 2], 4)
    assert one.visible()[0].long().tolist() == examples[0]["mask"]
    two = BlockCausalLayout.from_packed(**PACKED)
    assert two.visible()[0].long().tolist() == examples[1]["mask"]
    assert two.position_ids_BL[0].tolist() == list(range(17)) + list(range(12))


def test_layout_details():
    layout = BlockCausalLayout.from_packed(**PACKED, total_len=33)
    cu, max_len = layout.cu_seqlens()
    assert cu.tolist() == [0, 17, 29, 33] and max_len == 17
    vis = layout.visible()[0]
    assert vis[29:, 29:].equal(torch.ones(4, 4).tril().bool())  # padding: its own causal doc
    assert not vis[29:, :29].any() and not vis[:29, 29:].any()
    assert not layout.is_causal
    assert BlockCausalLayout.from_packed([0, 5, 9], [5, 1], 1).is_causal
    additive = layout.dense_mask(torch.float32)
    assert additive.shape == (1, 1, 33, 33) and additive[0, 0, 0, 1] == torch.finfo().min
    with pytest.raises(ValueError, match="sample 1: causal_len 13"):
        BlockCausalLayout.from_packed([0, 17, 29], [5, 13], 4)
    with pytest.raises(ValueError, match="total_len 20"):
        BlockCausalLayout.from_packed(**PACKED, total_len=20)


def test_backend_names():
    with pytest.raises(ValueError, match="'sdpa2'.*auto, sdpa, flex, flash"):
        resolve_backend("sdpa2", "cpu")
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="'flash' needs flash-attn installed and a CUDA device"):
        resolve_backend("flash", "cpu")
    with pytest.raises(ValueError, match="'auto'"):
        attention_kwargs(BlockCausalLayout.from_packed([0, 3], [3], 1), "auto")


def test_flex_block_mask_equals_dense_mask_on_raw_attention():
    layout = BlockCausalLayout.stack([BlockCausalLayout.from_packed(**PACKED, total_len=40),
                                      BlockCausalLayout.from_packed([0, 40], [7], 16)])
    q, k, v = torch.randn(3, 2, 4, 40, 8).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask())
    out = flex_attention(q, k, v, block_mask=layout.block_mask())
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_flex_and_sdpa_agree_in_qwen3(qwen3, eager_flex):
    layout = BlockCausalLayout.from_packed(**PACKED, total_len=32)
    x = torch.randn(1, 32, 64)
    torch.testing.assert_close(run(qwen3, x, "flex", layout), run(qwen3, x, "sdpa", layout),
                               atol=1e-5, rtol=1e-5)


def test_packed_equals_unpacked_and_eager_float_mask(qwen3):
    x = torch.randn(1, 29, 64)
    packed = run(qwen3, x, "sdpa", BlockCausalLayout.from_packed(**PACKED))
    for (a, b), c in zip([(0, 17), (17, 29)], PACKED["causal_lens"]):
        alone = run(qwen3, x[:, a:b], "sdpa", BlockCausalLayout.from_packed([0, b - a], [c], 4))
        torch.testing.assert_close(packed[:, a:b], alone, atol=1e-5, rtol=1e-5)
    # Samples really are isolated: changing sample 0 leaves sample 1 untouched.
    x2 = x.clone()
    x2[:, :17] += 1
    changed = run(qwen3, x2, "sdpa", BlockCausalLayout.from_packed(**PACKED))
    assert torch.equal(changed[:, 17:], packed[:, 17:]) and not torch.equal(changed, packed)
    # eager needs the additive float form of the same mask
    qwen3.set_attn_implementation("eager")
    layout = BlockCausalLayout.from_packed(**PACKED)
    with torch.no_grad():
        eager = qwen3(inputs_embeds=x, use_cache=False,
                      **attention_kwargs(layout, "sdpa", float_dtype=torch.float32))
    torch.testing.assert_close(eager.last_hidden_state, packed, atol=1e-5, rtol=1e-5)


def reference_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False):
    """Stand-in for flash_attn_varlen_func (its documented semantics; the kernel can't be
    installed here): causal attention per sequence, GQA by head groups, [total, H, d]."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for a, b in zip(cu, cu[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal,
                                                  scale=softmax_scale,
                                                  enable_gqa=True).transpose(0, 1)
    return out


def test_flash_path_exact_for_causal_rows_and_routes_block_rows(qwen3, eager_flex,
                                                                monkeypatch):
    calls = []
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = lambda *a, **kw: calls.append(kw) or reference_flash_varlen(
        *a, **kw)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    x = torch.randn(1, 32, 64)
    causal = BlockCausalLayout.from_packed([0, 20, 29], [20, 9], 1, total_len=32)
    torch.testing.assert_close(run(qwen3, x, "flash", causal), run(qwen3, x, "sdpa", causal),
                               atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # one kernel call per layer
    assert calls[0]["cu_seqlens_q"].tolist() == [0, 20, 29, 32] and calls[0]["causal"]
    block = BlockCausalLayout.from_packed(**PACKED, total_len=32)
    torch.testing.assert_close(run(qwen3, x, "flash", block), run(qwen3, x, "sdpa", block),
                               atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # block-causal rows were routed to flex, not the causal kernel


def test_kv_decoding_with_left_padding_matches_full_forward(qwen3):
    """Two prompts of different lengths, left-padded in one batch, prefilled with their
    [res_w, queries]-style last block, then one new block of P = 4 against the cache."""
    P, lengths, L = 4, [9, 6], 9
    seqs = [torch.randn(1, n + P, 64) for n in lengths]
    full = [run(qwen3, s, "sdpa", BlockCausalLayout.from_packed([0, s.shape[1]], [n - P], P))
            for s, n in zip(seqs, lengths)]
    prompt = torch.zeros(2, L, 64)
    for i, n in enumerate(lengths):
        prompt[i, L - n:] = seqs[i][0, :n]
    layout = left_padded_layout(lengths, L, last_block=P)
    qwen3.set_attn_implementation("sdpa")
    cache = DynamicCache(config=qwen3.config)
    with torch.no_grad():
        pre = qwen3(inputs_embeds=prompt, past_key_values=cache, use_cache=True,
                    attention_mask=layout.dense_mask(),
                    position_ids=layout.position_ids_BL).last_hidden_state
        new = torch.cat([s[:, n:] for s, n in zip(seqs, lengths)])
        step = qwen3(inputs_embeds=new, past_key_values=cache, use_cache=True,
                     attention_mask=decode_attention_mask(layout.doc_ids_BL >= 0, P),
                     position_ids=torch.tensor(lengths)[:, None] + torch.arange(P)
                     ).last_hidden_state
    for i, n in enumerate(lengths):
        torch.testing.assert_close(pre[i, L - n:], full[i][0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[i], full[i][0, n:], atol=1e-5, rtol=1e-5)
