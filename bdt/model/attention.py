"""The attention facade: one description of a packed sequence's mask, realised by several backends.

The mask is a `BlockCausalLayout` (`bdt.model.attention_masks`: the block-causal rule of method
§4); callers get the Hugging Face model kwargs for it from `attention_kwargs`. A backbone's
sliding-window or chunked layers (`LayerRule`) get one mask per distinct rule, handed to the model
as transformers' dict of masks per layer type.

Backends (`resolve_backend`; the model must be loaded with
`attention_kernels.hf_attn_implementation(backend)`):
- `sdpa`: a dense [B,1,L,L] mask (bool; additive float for models running `eager`, which reads a
  bool mask wrongly). O(L^2) memory per row (64 MiB at L = 8192); the model lays a packed row out
  as one row per sample when that is cheaper (`per_document_rows`). `auto` picks it everywhere:
  the only backend seen training on a GPU so far (README, "On a GPU").
- `flex`: torch flex_attention with a BlockMask built from the same rule, block-sparse. Needs a
  row length that is a multiple of FLEX_BLOCK and compiles once per row length (training pads
  every row of a stage to one length: `flex_row_len`); no backward on CPU (environment.md).
- `varlen` / `flash`: the causal-per-document kernels of torch (`torch.nn.attention.varlen`,
  CUDA, no extra build) / of flash-attn (`flash_attn_varlen_func`). They know only causal or full
  attention per document, exact for rows whose blocks all have size 1 (text, P = 1); a window
  is their window_size, a chunk one more document boundary. A block-causal row is neither: it
  would need two passes merged by their log-sum-exps, and both kernels' autograd ignores the
  LSE's gradient, so training through the merge would be wrong.
  These backends run their kernel where it is exact and flex for block-causal rows.
Rows whose length is not a multiple of FLEX_BLOCK (prefill prompts, KV-cached decoding) take the
dense mask through sdpa in every backend: one compile per prompt length would cost more than it
saves. The kernels themselves live in `bdt.model.attention_kernels`.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from bdt.model.attention_masks import FLEX_BLOCK, FULL, BlockCausalLayout, LayerRule

BACKENDS = ("auto", "sdpa", "flex", "varlen", "flash")
# The `attn_implementation` a Hugging Face model must be loaded with for each backend: ours is
# registered by `attention_kernels.register` (its name must not contain "flash": transformers
# then looks for its own flash kernels under that name).
HF_IMPLEMENTATION = {"sdpa": "sdpa", "flex": "bdt_attention", "varlen": "bdt_attention",
                      "flash": "bdt_attention"}


def flash_available() -> bool:
    """flash-attn importable and a CUDA device present."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def varlen_available() -> bool:
    """torch's own varlen attention (torch >= 2.10) and a CUDA device present."""
    return (torch.cuda.is_available()
            and importlib.util.find_spec("torch.nn.attention.varlen") is not None)


def flex_row_len(n_tokens: int, row_len: int | None = None) -> int:
    """The length a packed row of n_tokens is padded to for the flex kernels: row_len (a stage's
    token budget: one compiled shape per stage), else the next power of two (a handful of shapes,
    under dynamo's recompile limit of 8), rounded up to a multiple of FLEX_BLOCK."""
    if row_len is not None and row_len < n_tokens:
        raise ValueError(f"row_len {row_len} is shorter than the packed row ({n_tokens} tokens)")
    target = row_len if row_len is not None else 1 << max(n_tokens - 1, 1).bit_length()
    return -(-target // FLEX_BLOCK) * FLEX_BLOCK


def resolve_backend(name: str, device: torch.device | str) -> str:
    """`auto|sdpa|flex|varlen|flash` -> the backend to use on `device`; clear errors otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of "
                         f"{', '.join(BACKENDS)}")
    device_type = torch.device(device).type
    if name == "auto":
        return "sdpa"
    if name == "varlen" and (device_type != "cuda" or not varlen_available()):
        raise ValueError(f"attention backend 'varlen' needs torch.nn.attention.varlen (torch >= "
                         f"2.10, this is {torch.__version__}) and a CUDA device (device "
                         f"{device_type}); use 'auto', 'flex' or 'sdpa'")
    if name == "flash" and (device_type != "cuda" or not flash_available()):
        found = "found" if importlib.util.find_spec("flash_attn") else "not installed"
        raise ValueError(f"attention backend 'flash' needs flash-attn installed and a CUDA device "
                         f"(device {device_type}, flash_attn {found}); use 'auto', 'flex' or "
                         "'sdpa'")
    return name


@dataclass(frozen=True)
class VarlenPlan:
    """What the registered `bdt_attention` function needs to run a causal-per-document kernel."""

    kernel: str  # "varlen" (torch.nn.attention.varlen) | "flash" (flash-attn)
    cu_seqlens: Tensor  # int32 [n_docs+1] over the flattened B*L tokens
    max_seqlen: int
    window: int | None = None  # a sliding layer's: query i sees keys i - window + 1 .. i


def check_rules(backend: str, rules: Mapping[str, LayerRule]) -> None:
    """ValueError for a layer type the backend cannot mask exactly: torch's varlen kernel takes
    a window only from torch 2.12 on (window_size); every other combination is exact."""
    windowed = sorted(t for t, r in rules.items() if r.window is not None)
    if backend == "varlen" and windowed:
        from torch.nn.attention.varlen import varlen_attn

        if "window_size" not in inspect.signature(varlen_attn).parameters:
            raise ValueError(f"attention backend 'varlen' cannot apply the sliding window of "
                             f"the backbone's {', '.join(windowed)} layers: torch "
                             f"{torch.__version__}'s varlen_attn has no window_size (torch >= "
                             f"2.12); use 'flex', 'flash' or 'sdpa'")


def attention_kwargs(layout: BlockCausalLayout, backend: str,
                     float_dtype: torch.dtype | None = None,
                     rules: Mapping[str, LayerRule] | None = None) -> dict:
    """kwargs for the HF model call (`model(inputs_embeds=..., use_cache=False, **kwargs)`).

    `backend` is a resolved one (sdpa|flex|varlen|flash). For a model running `eager` pass its
    dtype as float_dtype to get the additive mask it needs. `rules`: layer type -> LayerRule
    (`bdt.model.backbone_config.layer_rules`); one rule gives one mask for every layer, several a dict
    of masks by layer type (built once per distinct rule), which the backbone must take.
    """
    if backend not in HF_IMPLEMENTATION:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of "
                         f"{', '.join(HF_IMPLEMENTATION)} (resolve 'auto' with resolve_backend)")
    rules = rules or {"full_attention": FULL}
    local = any(rule != FULL for rule in rules.values())
    mask = by_layer_type(rules, lambda rule: _layer_mask(layout, backend, float_dtype, rule,
                                                         local))
    if isinstance(mask, VarlenPlan):
        return {"position_ids": layout.position_ids_BL, "attention_mask": None,
                "bdt_varlen_plan": mask}
    return {"position_ids": layout.position_ids_BL, "attention_mask": mask}


def by_layer_type(rules: Mapping[str, LayerRule], make):
    """make(rule) once per distinct rule of `rules`: the one mask of every layer, or a dict of
    masks by layer type (what transformers' models with several layer types take)."""
    masks = {rule: make(rule) for rule in set(rules.values())}
    if len(masks) == 1:
        return next(iter(masks.values()))
    return {kind: masks[rule] for kind, rule in rules.items()}


def _layer_mask(layout: BlockCausalLayout, backend: str, float_dtype: torch.dtype | None,
                rule: LayerRule, local: bool):
    """The mask of one rule in `backend`: a VarlenPlan, a flex BlockMask (`local`: the
    backbone has local layers, see `mask_mod`) or a dense mask."""
    L = layout.doc_ids_BL.shape[1]
    if backend in ("varlen", "flash") and layout.is_causal:
        return VarlenPlan(backend, *layout.cu_seqlens(rule.chunk), rule.window)
    if backend != "sdpa" and L % FLEX_BLOCK == 0:
        return layout.block_mask(rule=rule if local else None)
    return layout.dense_mask(float_dtype, rule)

