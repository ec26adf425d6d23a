"""Attention facade: fixture masks, backends agree inside a tiny Qwen3, packing, KV decoding,
flex compiling once per stage. The tests marked `cuda` run the real kernels (scripts/gpu_check.sh)."""

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

import bdt.model.attention_kernels as kernels
from bdt.model.ar import BitDanceModel
from bdt.model.attention import (attention_kwargs, by_layer_type, check_rules, flex_row_len,
                                 resolve_backend)
from bdt.model.attention_kernels import hf_attn_implementation
from bdt.model.attention_masks import (FLEX_BLOCK, FULL, BlockCausalLayout, LayerRule,
                                       decode_attention_mask, left_padded_layout)
from bdt.model.backbone_config import layer_rules
from bdt.model.config import ModelConfig
from bdt.model.head import HeadConfig
from bdt.model.sequence import ImageSample, SequencePacker
from bdt.model.text_tokenizer import PromptIds, SpecialTokens

from reference import REF

# Uncompiled flex is intended in the raw-kernel check; torch warns about it once.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
PACKED = dict(cu_seqlens=[0, 17, 29], causal_lens=[5, 4], block_sizes=[4, 4])
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def qwen3() -> Qwen3Model:
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=64)
    return Qwen3Model(cfg).eval()


def run(model, x, backend, layout, rules=None, **extra):
    model.set_attn_implementation(hf_attn_implementation(backend))
    with torch.no_grad():
        return model(inputs_embeds=x, use_cache=False,
                     **attention_kwargs(layout, backend, rules=rules), **extra).last_hidden_state


TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# Backbones with local layers, windows and chunks of a few tokens: Mistral (every layer),
# Qwen2 (use_sliding_window: the layers from max_window_layers on), Gemma 3 (sliding and
# full), Llama 4 (chunked and full; its text model: its causal LM is no decoder bdt can call).
LOCAL = {
    "Mistral": ("MistralConfig", dict(sliding_window=3)),
    "Qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=3,
                                  max_window_layers=1)),
    "Gemma3": ("Gemma3TextConfig", dict(sliding_window=3,
                                        layer_types=["sliding_attention", "full_attention"])),
    "Llama4": ("Llama4TextConfig", dict(attention_chunk_size=4, num_local_experts=2,
                                        intermediate_size_mlp=64, no_rope_layers=[1, 0],
                                        layer_types=["chunked_attention", "full_attention"])),
}


def local_model(name: str):
    """A tiny random base model (no LM head) of LOCAL[name], eval mode."""
    import transformers

    config_class, extra = LOCAL[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**TINY, **extra)
    return transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture
def flex_compiles(monkeypatch):
    """Our flex path traced by dynamo as in training, but lowered by a counting backend that runs
    the graph as traced: an Inductor build costs 10-80 s on this CPU (environment.md), and the
    graphs dynamo makes (what recompiles) are the same. Yields the counter."""
    torch._dynamo.reset()  # no cache entries (or recompile counts) left from other tests
    counter = CompileCounter()
    monkeypatch.setattr(kernels, "FLEX_COMPILE_BACKEND", counter)
    yield counter
    torch._dynamo.reset()


def test_masks_equal_sequence_tiny_fixture():
    examples = json.loads((REF / "sequence_tiny.json").read_text())["attention_mask"]["examples"]
    for ex in examples:
        # causal_len = text + <|vision_start|> + <|res_h|>; then blocks of P from <|res_w|> on.
        lens = ex["sample_lens (document_lens)"]
        layout = BlockCausalLayout.from_packed([sum(lens[:i]) for i in range(len(lens) + 1)],
                                               [n + 2 for n in ex["split_lens"][0::2]],
                                               ex["parallel_num"])
        assert layout.visible()[0].long().tolist() == ex["mask"]
        assert layout.position_ids_BL[0].tolist() == [i for n in lens for i in range(n)]


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


def test_window_and_chunk_inside_blocks():
    """A window is measured from the query (HF's sliding_window_overlay and its Gemma 3 image
    blocks): a block's later keys stay visible, earlier ones within the window; a chunk keeps
    the keys of the query's chunk. Positions restart per sample."""
    layout = BlockCausalLayout.from_packed([0, 3, 13], [3, 2], [1, 4])  # blocks 5-8, 9-12
    vis = lambda rule, i: layout.visible(rule=rule)[0, i].nonzero().reshape(-1).tolist()  # noqa
    assert vis(FULL, 9) == list(range(3, 13))
    assert vis(LayerRule(window=3), 9) == [7, 8, 9, 10, 11, 12]  # key 6: 4 positions back
    assert vis(LayerRule(window=3), 12) == [10, 11, 12]
    assert vis(LayerRule(window=3), 2) == [0, 1, 2]  # sample 0's own positions
    assert vis(LayerRule(chunk=4), 9) == [7, 8, 9, 10]  # positions 4-7 of sample 1
    assert vis(LayerRule(chunk=4), 3) == [3]
    cu, longest = BlockCausalLayout.from_packed([0, 10, 16], [10, 6], 1).cu_seqlens(chunk=4)
    assert cu.tolist() == [0, 4, 8, 10, 14, 16] and longest == 4
    with pytest.raises(ValueError, match=r"window must be a whole number >= 1 and < 2\^31, got 0"):
        LayerRule(window=0)


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_windows_and_chunks_are_the_backbones_own(name, flex_compiles):
    """Each sample of a packed causal row (P = 1) gets what Hugging Face's own forward of that
    sample alone computes with its sliding-window / chunked masks, through sdpa and flex."""
    model = local_model(name)
    rules = layer_rules(model)
    assert len(rules) == (1 if name == "Mistral" else 2)
    lengths = [11, 9]
    layout = BlockCausalLayout.from_packed([0, 11, 20], lengths, 1, total_len=FLEX_BLOCK)
    x = torch.randn(1, FLEX_BLOCK, 32)
    with torch.no_grad():
        alone = [model(inputs_embeds=x[:, a:b]).last_hidden_state for a, b in [(0, 11), (11, 20)]]
    for backend in ("sdpa", "flex"):
        packed = run(model, x, backend, layout, rules)
        torch.testing.assert_close(packed[:, :11], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed[:, 11:20], alone[1], atol=1e-5, rtol=1e-5)
    # Not vacuous: the whole sample in every layer is another result.
    assert not torch.allclose(run(model, x, "sdpa", layout)[:, :11], alone[0], atol=1e-3)


def test_one_mask_for_full_layers_and_refusals(qwen3, monkeypatch):
    """All-full backbones (Qwen3) keep their one mask; layer types that need different masks are
    refused where the backbone takes one (Mistral ignores layer_types), and torch's varlen
    without window_size is refused for sliding layers."""
    from transformers import MistralConfig, MistralModel

    assert layer_rules(qwen3) == {"full_attention": FULL}
    layout = BlockCausalLayout.from_packed(**PACKED)
    ours = attention_kwargs(layout, "sdpa", rules=layer_rules(qwen3))
    assert torch.equal(ours["attention_mask"], attention_kwargs(layout, "sdpa")["attention_mask"])
    mistral = MistralModel(MistralConfig(**TINY, sliding_window=3,
                                         layer_types=["sliding_attention", "full_attention"]))
    with pytest.raises(ValueError, match="MistralModel: its layer types need different masks "
                                         r"\(full_attention: .*its forward takes one"):
        layer_rules(mistral)
    mistral = local_model("Mistral")
    mistral.config.sliding_window = 0
    with pytest.raises(ValueError, match="sliding_window=0 of its sliding_attention layers"):
        layer_rules(mistral)
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", lambda q, k, v, cu_q, cu_k, max_q, max_k,
                        is_causal=False: None)  # torch 2.10's signature
    with pytest.raises(ValueError, match="'varlen' cannot apply the sliding window of the "
                                         "backbone's sliding_attention layers"):
        check_rules("varlen", layer_rules(local_model("Qwen2")))
    check_rules("varlen", layer_rules(local_model("Llama4")))  # chunks: document boundaries


def test_backend_names():
    with pytest.raises(ValueError, match="'sdpa2'.*auto, sdpa, flex, varlen, flash"):
        resolve_backend("sdpa2", "cpu")
    assert resolve_backend("auto", "cpu") == "sdpa" and resolve_backend("auto", "cuda") == "sdpa"
    assert resolve_backend("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="'flash' needs flash-attn installed and a CUDA device"):
        resolve_backend("flash", "cpu")
    with pytest.raises(ValueError, match="'varlen' needs torch.nn.attention.varlen"):
        resolve_backend("varlen", "cpu")
    with pytest.raises(ValueError, match="'auto'"):
        attention_kwargs(BlockCausalLayout.from_packed([0, 3], [3], 1), "auto")


def test_flex_block_mask_equals_create_block_mask_and_dense_mask():
    L = 3 * FLEX_BLOCK
    layout = BlockCausalLayout.stack([
        BlockCausalLayout.from_packed([0, 17, 29, 300], [5, 4, 40], [4, 4, 16], total_len=L),
        BlockCausalLayout.from_packed([0, L], [7], 16)])
    ours = layout.block_mask()
    theirs = create_block_mask(layout.mask_mod(), 2, None, L, L, device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())  # partial + full tiles
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    assert int(ours.full_kv_num_blocks.sum()) > 0  # full tiles exist: the split is exercised
    q, k, v = torch.randn(3, 2, 4, L, 8).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.dense_mask())
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=ours), ref, atol=1e-6,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 128, got 29: pad the row"):
        BlockCausalLayout.from_packed(**PACKED).block_mask()


def test_flex_row_len():
    assert flex_row_len(29) == 128 and flex_row_len(200) == 256 and flex_row_len(1000) == 1024
    assert flex_row_len(29, row_len=1000) == 1024  # the stage's budget, rounded up to a tile
    with pytest.raises(ValueError, match="row_len 20 is shorter than the packed row"):
        flex_row_len(29, row_len=20)


def test_flex_and_sdpa_agree_in_qwen3(qwen3, flex_compiles):
    layout = BlockCausalLayout.from_packed(**PACKED, total_len=FLEX_BLOCK)
    x = torch.randn(1, FLEX_BLOCK, 64)
    torch.testing.assert_close(run(qwen3, x, "flex", layout), run(qwen3, x, "sdpa", layout),
                               atol=1e-5, rtol=1e-5)
    assert flex_compiles.frame_count == 1
    # Rows of another length (a prompt prefill) take the dense mask through sdpa: no compile.
    odd = BlockCausalLayout.from_packed(**PACKED)
    torch.testing.assert_close(run(qwen3, x[:, :29], "flex", odd),
                               run(qwen3, x[:, :29], "sdpa", odd), atol=1e-5, rtol=1e-5)
    assert flex_compiles.frame_count == 1


def tiny_bitdance(device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A random tiny BitDanceModel (Qwen3 hidden 64) and a packer for it, P = 4."""
    torch.manual_seed(0)
    llm = Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       vocab_size=64, attn_implementation="sdpa"))
    cfg = ModelConfig(head=HeadConfig(width=32, depth=2, num_adaln_sets=2, head_dim=16, bits=8),
                      parallel_num=4, attn_backend="sdpa", pos_max_len=16)
    model = BitDanceModel(cfg, llm).to(device, dtype)
    special = SpecialTokens(im_start=1, im_end=2, vision_start=3, vision_end=4,
                            res_ids=tuple(range(10, 26)), query_ids=(26, 27, 28), vocab_size=64)
    packer = SequencePacker(special, PromptIds((1, 5), (2, 1, 6), (1, 6)), 4, max_len=256)
    return model, packer


def packed_rows(packer, seed: int = 0):
    """Three rows of different packings and lengths (2, 3, 4 samples; 43 to 180 tokens)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for sides in [(2, 4), (4, 2, 6), (8, 2, 4, 6)]:
        rows.append(packer.pack([ImageSample(
            list(torch.randint(30, 64, (3 + i,), generator=g).tolist()),
            torch.where(torch.rand(s, 2 * (i % 2 + 1), 8, generator=g) > 0.5, 1.0, -1.0))
            for i, s in enumerate(sides)]))
    return rows


def losses_of(model, rows, row_len, seed=0):
    return [model(p, generator=torch.Generator(model.llm.device).manual_seed(seed),
                  row_len=row_len) for p in rows]


def test_flex_training_rows_compile_once_and_match_sdpa(flex_compiles):
    """The hang on the first GPU run: rows of a new length every step. Three rows of different
    packings and lengths, padded to the stage's row length, compile flex once; the BlockMask is
    built without dynamo; the losses are sdpa's. (Transformers' own flex path, which bdt used
    before, compiles these three rows twice: static, then again for symbolic lengths.)"""
    model, packer = tiny_bitdance()
    model.eval()  # flex has no backward on CPU; the graphs dynamo traces are the forward's
    rows = packed_rows(packer)
    assert len({int(p.cu_seqlens_S1[-1]) for p in rows}) == 3
    with torch.no_grad():
        sdpa = losses_of(model, rows, row_len=250)
        model.set_attn_backend("flex")
        frames = counters["frames"]["total"]
        masks = [BlockCausalLayout.from_packed(p.cu_seqlens_S1, p.causal_len_S, p.block_size_S,
                                               total_len=256).block_mask() for p in rows]
        assert counters["frames"]["total"] == frames and len(masks) == 3
        flex = losses_of(model, rows, row_len=250)
    assert flex_compiles.frame_count == 1
    for a, b in zip(flex, sdpa):
        for key in ("total", "text_ce", "vision"):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


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
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1)):
    """Stand-in for flash_attn_varlen_func (its documented semantics; the kernel can't be
    installed here): causal attention per sequence, GQA by head groups, [total, H, d]; query i
    sees keys i - window_size[0] .. i (-1: all)."""
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for a, b in zip(cu, cu[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        i = torch.arange(b - a)
        mask = (i[None] <= i[:, None]) if causal else torch.ones(b - a, b - a, dtype=torch.bool)
        if window_size[0] >= 0:
            mask &= i[:, None] - i[None] <= window_size[0]
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask,
                                                  scale=softmax_scale,
                                                  enable_gqa=True).transpose(0, 1)
    return out


def reference_torch_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1),
                           scale=None, enable_gqa=False, **_):
    """Stand-in for torch.nn.attention.varlen.varlen_attn (its documented semantics; the kernel
    is CUDA-only): window (w, 0) is causal per sequence, w keys back (-1: all)."""
    assert window_size[1] in (0, -1) and enable_gqa
    return reference_flash_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, softmax_scale=scale,
                                  causal=window_size[1] == 0, window_size=window_size)


def stand_in_kernels(monkeypatch, backend: str) -> list:
    """Our varlen/flash kernels replaced by their references; returns the kwargs of each call."""
    calls = []
    if backend == "flash":
        fake = types.ModuleType("flash_attn")
        fake.flash_attn_varlen_func = lambda *a, **kw: calls.append(kw) or \
            reference_flash_varlen(*a, **kw)
        monkeypatch.setitem(sys.modules, "flash_attn", fake)
    else:
        import functools

        import torch.nn.attention.varlen as varlen

        stand_in = functools.wraps(varlen.varlen_attn)(  # keeps the signature our code reads
            lambda *a, **kw: calls.append(kw) or reference_torch_varlen(*a, **kw))
        monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    return calls


@pytest.mark.parametrize("backend", ["flash", "varlen"])
def test_varlen_paths_exact_for_causal_rows_and_route_block_rows(qwen3, flex_compiles,
                                                                 monkeypatch, backend):
    calls = stand_in_kernels(monkeypatch, backend)
    x = torch.randn(1, FLEX_BLOCK, 64)
    causal = BlockCausalLayout.from_packed([0, 20, 29], [20, 9], 1, total_len=32)
    torch.testing.assert_close(run(qwen3, x[:, :32], backend, causal),
                               run(qwen3, x[:, :32], "sdpa", causal), atol=1e-5, rtol=1e-5)
    assert len(calls) == 2  # one kernel call per layer
    if backend == "flash":
        assert calls[0]["cu_seqlens_q"].tolist() == [0, 20, 29, 32] and calls[0]["causal"]
    block = BlockCausalLayout.from_packed(**PACKED, total_len=FLEX_BLOCK)
    torch.testing.assert_close(run(qwen3, x, backend, block), run(qwen3, x, "sdpa", block),
                               atol=1e-5, rtol=1e-5)
    assert len(calls) == 2 and flex_compiles.frame_count == 1  # block rows went to flex


@pytest.mark.parametrize("backend", ["flash", "varlen"])
@pytest.mark.parametrize("name", ["Qwen2", "Llama4"])
def test_varlen_paths_window_and_chunk_layers(monkeypatch, flex_compiles, backend, name):
    """Causal rows run the kernel with the sliding layers' window and the chunks as documents
    of their own (one plan per layer type); block rows go to flex: all equal sdpa's masks."""
    calls = stand_in_kernels(monkeypatch, backend)
    model, x = local_model(name), torch.randn(1, FLEX_BLOCK, 32)
    rules = layer_rules(model)
    for layout in (BlockCausalLayout.from_packed([0, 11, 20], [11, 9], 1, total_len=32),
                   BlockCausalLayout.from_packed(**PACKED, total_len=FLEX_BLOCK)):
        L = layout.doc_ids_BL.shape[1]
        torch.testing.assert_close(run(model, x[:, :L], backend, layout, rules),
                                   run(model, x[:, :L], "sdpa", layout, rules),
                                   atol=1e-5, rtol=1e-5)
    window = calls[0].get("window_size", (-1, 0))
    cu = calls[0]["cu_seqlens_q"] if backend == "flash" else None
    assert len(calls) == 2 and flex_compiles.frame_count == 1
    if name == "Qwen2":  # layer 0 full, layer 1 sliding
        assert window in ((-1, 0), (-1, -1)) and calls[1]["window_size"] == (2, 0)
    elif cu is not None:  # layer 0 chunked: chunks of 4 are documents
        assert cu.tolist() == [0, 4, 8, 11, 15, 19, 20, 24, 28, 32]


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


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_kv_decoding_of_local_layers_matches_full_forward(name):
    """Windows and chunks in KV-cached decoding: two left-padded prompts, prefilled, then two
    blocks of P = 4 against the cache (keys leave the window, chunks end), each layer type with
    its own mask: the full forward's hidden states under the same rules."""
    model = local_model(name)
    rules = layer_rules(model)
    P, lengths, L, steps = 4, [9, 6], 9, 2
    seqs = [torch.randn(1, n + steps * P, 32) for n in lengths]
    full = [run(model, s, "sdpa", BlockCausalLayout.from_packed([0, s.shape[1]], [n - P], P),
                rules) for s, n in zip(seqs, lengths)]
    by_type = lambda make: by_layer_type(rules, make)  # noqa: E731
    prompt = torch.zeros(2, L, 32)
    for i, n in enumerate(lengths):
        prompt[i, L - n:] = seqs[i][0, :n]
    layout = left_padded_layout(lengths, L, last_block=P)
    valid = layout.doc_ids_BL >= 0
    cache = DynamicCache()
    with torch.no_grad():
        out = [model(inputs_embeds=prompt, past_key_values=cache, use_cache=True,
                     position_ids=layout.position_ids_BL,
                     attention_mask=by_type(lambda r: layout.dense_mask(rule=r))
                     ).last_hidden_state]
        for k in range(steps):
            new = torch.cat([s[:, n + k * P:n + (k + 1) * P] for s, n in zip(seqs, lengths)])
            out.append(model(inputs_embeds=new, past_key_values=cache, use_cache=True,
                             attention_mask=by_type(lambda r: decode_attention_mask(valid, P,
                                                                                    rule=r)),
                             position_ids=torch.tensor(lengths)[:, None] + k * P + torch.arange(P)
                             ).last_hidden_state)
            valid = torch.cat([valid, torch.ones(2, P, dtype=torch.bool)], dim=1)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(out[0][i, L - n:], full[i][0, :n], atol=1e-5, rtol=1e-5)
        for k in range(steps):
            torch.testing.assert_close(out[k + 1][i], full[i][0, n + k * P:n + (k + 1) * P],
                                       atol=1e-5, rtol=1e-5)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])


@cuda
def test_cuda_flex_trains_compiled_once_and_matches_sdpa():
    """The first GPU run's hang, on CUDA: three training rows (forward + backward, Inductor,
    bf16) of different packings compile flex once; losses and gradients are sdpa's."""
    torch._dynamo.reset()
    model, packer = tiny_bitdance("cuda", torch.bfloat16)
    model.train()
    rows = packed_rows(packer)
    results = {}
    for backend in ("sdpa", "flex"):
        model.set_attn_backend(backend)
        model.zero_grad()
        graphs = counters["stats"]["unique_graphs"]
        losses = losses_of(model, rows, row_len=250)
        sum(out["total"] for out in losses).backward()
        results[backend] = (torch.stack([out["total"] for out in losses]).float(), _grads(model),
                            counters["stats"]["unique_graphs"] - graphs)
    assert results["flex"][2] == 1 and results["sdpa"][2] == 0
    torch.testing.assert_close(results["flex"][0], results["sdpa"][0], atol=2e-2, rtol=2e-2)
    g_flex, g_sdpa = results["flex"][1], results["sdpa"][1]
    assert (g_flex - g_sdpa).norm() <= 0.05 * g_sdpa.norm()


@cuda
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("backend", ["varlen", "flash"])
def test_cuda_varlen_kernels_match_sdpa(backend, window):
    """The real causal-per-document kernels (bf16) against sdpa on causal rows, with gradients;
    with a sliding layer (window 4: one key off is a quarter), their window_size against the
    dense mask's window."""
    try:
        resolve_backend(backend, "cuda")
    except ValueError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    local = {} if window is None else dict(use_sliding_window=True, sliding_window=window,
                                           max_window_layers=1)
    model = Qwen3Model(Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   vocab_size=64, **local)).to("cuda", torch.bfloat16)
    rules = layer_rules(model)
    assert len(rules) == (1 if window is None else 2)
    layout = BlockCausalLayout.from_packed([0, 100, 290], [100, 190], 1, total_len=300).to("cuda")
    x = torch.randn(1, 300, 256, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for name in ("sdpa", backend):
        model.set_attn_implementation(hf_attn_implementation(name))
        x_ = x.clone().requires_grad_()
        y = model(inputs_embeds=x_, use_cache=False,
                  **attention_kwargs(layout, name, rules=rules))
        y.last_hidden_state.float().square().mean().backward()
        outs[name] = (y.last_hidden_state.float(), x_.grad.float())
    for a, b in zip(outs[backend], outs["sdpa"]):
        assert (a - b).norm() <= 0.02 * b.norm()
