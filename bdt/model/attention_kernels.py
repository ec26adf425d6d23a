"""The kernels behind the `flex`, `varlen` and `flash` attention backends: one attention function,
registered with transformers' AttentionInterface as `bdt_attention`, that runs what
`bdt.model.attention.attention_kwargs` planned for the batch:

- a flex BlockMask -> flex_attention, compiled once per shape (`compiled_flex`);
- a VarlenPlan (the `bdt_varlen_plan` kwarg, or a layer type's mask in a dict of masks) ->
  torch's varlen_attn or flash-attn's flash_attn_varlen_func, causal per document (and windowed);
- a dense 4D mask (prefill, KV-cached decoding) -> transformers' sdpa attention.

Why flex is compiled here and not through transformers' `flex_attention` implementation: that
one compiles with automatic dynamic shapes, so the second row length recompiles flex (forward
and backward) for symbolic lengths, and a row length that differs every step is what packed
training produces. Here the compile is static (`dynamic=False`): the trainer pads every row of a
stage to one length (`attention.flex_row_len`), so each stage compiles once. Should a run still
recompile past dynamo's limit, it fails loudly instead of falling back to eager flex, which
materialises every [L, L] score matrix (17 GB per layer at L = 16K, 16 heads, fp32).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

from bdt.model.attention import HF_IMPLEMENTATION, VarlenPlan

# What torch.compile lowers flex with; tests swap in a counting backend (no Inductor build).
FLEX_COMPILE_BACKEND: object = "inductor"


@functools.cache
def compiled_flex(backend: object = "inductor"):
    """flex_attention compiled for static shapes (one graph per distinct row length)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True, backend=backend)


def flex(query: Tensor, key: Tensor, value: Tensor, block_mask, scale: float | None) -> Tensor:
    """[B, Hq, L, d] attention under `block_mask`; key/value may have fewer (grouped) heads."""
    enable_gqa = query.shape[1] != key.shape[1]
    if torch.compiler.is_compiling():  # inside a compiled decoder layer: part of its graph
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(query, key, value, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        return compiled_flex(FLEX_COMPILE_BACKEND)(query, key, value, block_mask=block_mask,
                                                   scale=scale, enable_gqa=enable_gqa)


def torch_varlen(q_THd: Tensor, k_THd: Tensor, v_THd: Tensor, plan: VarlenPlan,
                 scale: float | None) -> Tensor:
    """Causal attention per document with torch's varlen kernel. Its signature grew from 2.10
    (is_causal; no scale, no grouped heads) to 2.12 (window_size, scale, enable_gqa): adapt."""
    from torch.nn.attention.varlen import varlen_attn

    params, d = inspect.signature(varlen_attn).parameters, q_THd.shape[-1]
    left = -1 if plan.window is None else plan.window - 1  # attention.check_rules: 2.12+ only
    kwargs = {"window_size": (left, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None:  # fold a non-default scale into the queries
        q_THd = q_THd * (scale * d ** 0.5)
    if q_THd.shape[1] != k_THd.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q_THd.shape[1] // k_THd.shape[1]
            k_THd, v_THd = (x.repeat_interleave(groups, dim=1) for x in (k_THd, v_THd))
    cu = plan.cu_seqlens
    return varlen_attn(q_THd, k_THd, v_THd, cu, cu, plan.max_seqlen, plan.max_seqlen, **kwargs)


def flash_varlen(q_THd: Tensor, k_THd: Tensor, v_THd: Tensor, plan: VarlenPlan,
                 scale: float | None) -> Tensor:
    """Causal attention per document with flash-attn (grouped heads supported natively)."""
    from flash_attn import flash_attn_varlen_func

    cu = plan.cu_seqlens
    window = {} if plan.window is None else {"window_size": (plan.window - 1, 0)}
    return flash_attn_varlen_func(q_THd, k_THd, v_THd, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                  max_seqlen_q=plan.max_seqlen, max_seqlen_k=plan.max_seqlen,
                                  dropout_p=0.0, softmax_scale=scale, causal=True, **window)


_VARLEN_KERNELS = {"varlen": torch_varlen, "flash": flash_varlen}


def bdt_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                  scaling: float | None = None, dropout: float = 0.0,
                  bdt_varlen_plan: VarlenPlan | None = None, **kwargs):
    """HF attention function: q/k/v [B, H, L, d] -> ([B, L, Hq, d], None)."""
    from torch.nn.attention.flex_attention import BlockMask

    if dropout:
        raise ValueError(f"bdt_attention has no attention dropout (got {dropout}); set the "
                         "backbone's attention_dropout to 0")
    if isinstance(attention_mask, VarlenPlan):  # this layer type's plan (a dict of masks)
        bdt_varlen_plan = attention_mask
    if bdt_varlen_plan is not None:
        B, H, L, d = query.shape
        flat = lambda x: x.transpose(1, 2).reshape(B * L, x.shape[1], d)  # noqa: E731
        out = _VARLEN_KERNELS[bdt_varlen_plan.kernel](flat(query), flat(key), flat(value),
                                                      bdt_varlen_plan, scaling)
        return out.view(B, L, H, d), None
    if isinstance(attention_mask, BlockMask):
        out = flex(query, key, value, attention_mask, scaling)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None:
        raise ValueError("bdt_attention needs attention_kwargs(layout, backend) or an explicit "
                         "4D attention_mask")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  **kwargs)


def register() -> None:
    """Register `bdt_attention` with transformers' AttentionInterface (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register("bdt_attention", bdt_attention)


def hf_attn_implementation(backend: str) -> str:
    """The HF `attn_implementation` for a resolved backend (registers ours where needed)."""
    if backend not in HF_IMPLEMENTATION:
        raise ValueError(f"attention backend {backend!r} is not resolved; expected one of "
                         f"{', '.join(HF_IMPLEMENTATION)} (see resolve_backend)")
    if HF_IMPLEMENTATION[backend] == "bdt_attention":
        register()
    return HF_IMPLEMENTATION[backend]
