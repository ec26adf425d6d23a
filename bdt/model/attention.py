"""The attention facade: one description of a packed sequence's mask, realised by several backends.

A packed row of L tokens holds several samples ("documents"). Each token carries a document id and
a block id, non-decreasing along the row; key j is visible to query i iff both are in the same
document and block[j] <= block[i]. Text tokens are blocks of one (causal); image tokens come in
blocks of P (full inside a block, causal across blocks): the block-causal mask of method §4.
Callers describe a row as cumulative sample lengths + per sample (causal_len, P)
(`BlockCausalLayout.from_packed`) and get the Hugging Face model kwargs from `attention_kwargs`.

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
  attention per document, exact for rows whose blocks all have size 1 (text, P = 1). A
  block-causal row is neither: it would need two passes merged by their log-sum-exps, and both
  kernels' autograd ignores the LSE's gradient, so training through the merge would be wrong.
  These backends run their kernel where it is exact and flex for block-causal rows.
Rows whose length is not a multiple of FLEX_BLOCK (prefill prompts, KV-cached decoding) take the
dense mask through sdpa in every backend: one compile per prompt length would cost more than it
saves. The kernels themselves live in `bdt.model.attention_kernels`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

BACKENDS = ("auto", "sdpa", "flex", "varlen", "flash")
# The `attn_implementation` a Hugging Face model must be loaded with for each backend: ours is
# registered by `attention_kernels.register` (its name must not contain "flash": transformers
# then looks for its own flash kernels under that name).
HF_IMPLEMENTATION = {"sdpa": "sdpa", "flex": "bdt_attention", "varlen": "bdt_attention",
                      "flash": "bdt_attention"}
FLEX_BLOCK = 128  # flex_attention's sparse block size (_DEFAULT_SPARSE_BLOCK_SIZE)
_MASK_CHUNK_PAIRS = 1 << 24  # query-key pairs evaluated at once while building a BlockMask


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
class BlockCausalLayout:
    """Rows of packed tokens: document id, block id and restarting RoPE position per token."""

    doc_ids_BL: Tensor  # int64; ids never repeat across documents within a row
    block_ids_BL: Tensor  # int64, non-decreasing along each row; a block never spans documents
    position_ids_BL: Tensor  # int64, 0 at each document's first token

    @classmethod
    def from_packed(cls, cu_seqlens: Sequence[int] | Tensor, causal_lens: Sequence[int] | Tensor,
                    block_sizes: Sequence[int] | Tensor | int,
                    total_len: int | None = None) -> BlockCausalLayout:
        """One row from cumulative sample lengths [S+1] and per sample (causal_len, block size P).

        Sample s is causal over its first causal_len[s] tokens, then blocks of P (a shorter last
        block if its length doesn't divide). total_len > cu_seqlens[-1] pads the row with one
        causal padding document (it sees only itself, so no query row is fully masked).
        """
        cu = [int(c) for c in torch.as_tensor(cu_seqlens).tolist()]
        causal = [int(c) for c in torch.as_tensor(causal_lens).reshape(-1).tolist()]
        S = len(cu) - 1
        sizes = ([int(block_sizes)] * S if isinstance(block_sizes, int)
                 else [int(p) for p in torch.as_tensor(block_sizes).reshape(-1).tolist()])
        if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
        if len(causal) != S or len(sizes) != S:
            raise ValueError(f"{S} samples in cu_seqlens but {len(causal)} causal_lens and "
                             f"{len(sizes)} block sizes")
        L = cu[-1] if total_len is None else total_len
        if L < cu[-1]:
            raise ValueError(f"total_len {L} is shorter than the packed samples ({cu[-1]})")
        doc, block, pos = [], [], []
        next_block = 0  # block ids keep increasing across documents
        for s in range(S):
            n, c, P = cu[s + 1] - cu[s], causal[s], sizes[s]
            if not 0 <= c <= n or P < 1:
                raise ValueError(f"sample {s}: causal_len {c} must be in [0, {n}] and block "
                                 f"size {P} >= 1")
            local = torch.arange(n)
            ids = next_block + torch.where(local < c, local, c + (local - c) // P)
            next_block = int(ids[-1]) + 1 if n else next_block
            doc.append(torch.full((n,), s))
            block.append(ids)
            pos.append(local)
        if L > cu[-1]:  # one causal padding document
            pad = torch.arange(L - cu[-1])
            doc.append(torch.full_like(pad, S))
            block.append(next_block + pad)
            pos.append(pad)
        return cls(torch.cat(doc)[None], torch.cat(block)[None], torch.cat(pos)[None])

    @classmethod
    def stack(cls, rows: Sequence[BlockCausalLayout]) -> BlockCausalLayout:
        """Several single-row layouts of equal length as one batch."""
        if len({r.doc_ids_BL.shape[1] for r in rows}) != 1:
            raise ValueError("rows must have the same length (pad with from_packed(total_len=))")
        return cls(*(torch.cat([getattr(r, f) for r in rows])
                     for f in ("doc_ids_BL", "block_ids_BL", "position_ids_BL")))

    @property
    def is_causal(self) -> bool:
        """True when every block has one token: plain causal attention inside each document."""
        return bool((self.block_ids_BL.diff(dim=1) != 0).all())

    def visible(self, queries: slice = slice(None)) -> Tensor:
        """bool [B, Q, L]: [b, i, j] = key j visible to query i (all queries, or a slice)."""
        d, k = self.doc_ids_BL, self.block_ids_BL
        dq, kq = d[:, queries], k[:, queries]
        return (dq[:, :, None] == d[:, None, :]) & (k[:, None, :] <= kq[:, :, None])

    def dense_mask(self, float_dtype: torch.dtype | None = None) -> Tensor:
        """[B, 1, L, L]: bool (True = attend), or additive float of float_dtype (for eager)."""
        mask = self.visible()[:, None]
        return mask if float_dtype is None else to_additive(mask, float_dtype)

    def mask_mod(self):
        """flex_attention mask_mod implementing `visible` (no tensors materialised)."""
        doc, block = self.doc_ids_BL, self.block_ids_BL

        def visible(b, h, q_idx, kv_idx):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (block[b, kv_idx] <= block[b, q_idx])
        return visible

    def block_mask(self, device: torch.device | str | None = None):
        """A flex_attention BlockMask [B, 1, L, L] of the same mask; L a multiple of FLEX_BLOCK.

        Built here, not by create_block_mask: uncompiled, that evaluates mask_mod on all L x L
        pairs at once (4 GB of index gathers at L = 16K); compiled, it is one more graph that
        recompiles as rows change. Here `visible` runs on a few query tiles at a time
        (_MASK_CHUNK_PAIRS), reduced to which FLEX_BLOCK tiles are partly or fully visible.
        """
        from torch.nn.attention.flex_attention import BlockMask

        B, L = self.doc_ids_BL.shape
        if L % FLEX_BLOCK:
            raise ValueError(f"a flex BlockMask needs a row length that is a multiple of "
                             f"{FLEX_BLOCK}, got {L}: pad the row (flex_row_len)")
        layout = self.to(device or self.doc_ids_BL.device)
        n = L // FLEX_BLOCK
        step = max(1, _MASK_CHUNK_PAIRS // (FLEX_BLOCK * L)) * FLEX_BLOCK
        some, full = [], []
        for q0 in range(0, L, step):
            tiles = layout.visible(slice(q0, q0 + step)).view(B, -1, FLEX_BLOCK, n, FLEX_BLOCK)
            some.append(tiles.any(dim=4).any(dim=2))
            full.append(tiles.all(dim=4).all(dim=2))
        full_BQK = torch.cat(full, dim=1)
        partial_BQK = torch.cat(some, dim=1) & ~full_BQK
        return BlockMask.from_kv_blocks(*_ordered_blocks(partial_BQK), *_ordered_blocks(full_BQK),
                                        BLOCK_SIZE=FLEX_BLOCK, mask_mod=layout.mask_mod(),
                                        seq_lengths=(L, L))

    def cu_seqlens(self) -> tuple[Tensor, int]:
        """Document boundaries over the flattened rows (int32 [n_docs+1]) and the longest doc."""
        d = self.doc_ids_BL
        starts = torch.ones_like(d, dtype=torch.bool)
        starts[:, 1:] = d[:, 1:] != d[:, :-1]
        idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
        cu = torch.cat([idx, torch.tensor([d.numel()], device=d.device)]).to(torch.int32)
        return cu, int(cu.diff().max())

    def to(self, device: torch.device | str) -> BlockCausalLayout:
        return BlockCausalLayout(self.doc_ids_BL.to(device), self.block_ids_BL.to(device),
                                 self.position_ids_BL.to(device))


def per_document_rows(cu_seqlens: Sequence[int] | Tensor, causal_lens: Sequence[int] | Tensor,
                      block_sizes: Sequence[int] | Tensor, token_cost: float, pair_cost: float
                      ) -> tuple[BlockCausalLayout, Tensor] | None:
    """A packed row re-laid as one right-padded row per document, for dense-mask attention,
    when that costs less; else None.

    A dense [L, L] mask (sdpa) computes every query-key pair of the row, then discards the pairs
    between documents: with S documents of about L/S tokens, S - 1 of every S pairs. One row per
    document computes S * Lmax^2 pairs instead, for S * Lmax - L padding tokens through every
    layer. Cost per layer: `token_cost` per token (its weight MACs) + `pair_cost` per computed
    query-key pair (QK^T and AV: 2 x heads x head_dim MACs). The CPU demo's rows (~11 samples
    of ~90 tokens in 1024, hidden 128) need 2.4x fewer backbone MACs this way. Each row keeps
    its document's own block-causal mask, so the result is the packed one up to float rounding.

    Returns (layout [S, Lmax], index [L]: where each packed token sits in the flattened S * Lmax
    batch)."""
    cu = torch.as_tensor(cu_seqlens).reshape(-1).to(torch.int64)
    lengths = cu.diff()
    S, L = len(lengths), int(cu[-1])
    if S < 2:
        return None
    Lmax = int(lengths.max())
    packed = L * token_cost + L * L * pair_cost
    split = S * Lmax * token_cost + S * Lmax * Lmax * pair_cost
    if split >= packed:
        return None
    causal = torch.as_tensor(causal_lens).reshape(-1).tolist()
    sizes = torch.as_tensor(block_sizes).reshape(-1).tolist()
    rows = BlockCausalLayout.stack([
        BlockCausalLayout.from_packed([0, n], [causal[s]], [sizes[s]], total_len=Lmax)
        for s, n in enumerate(lengths.tolist())])
    doc_L = torch.repeat_interleave(torch.arange(S), lengths)
    index_L = doc_L * Lmax + (torch.arange(L) - cu[doc_L])
    return rows, index_L


def _ordered_blocks(tiles_BQK: Tensor) -> tuple[Tensor, Tensor]:
    """[B, Q, K] bool tiles -> (count [B, 1, Q], key-tile indices [B, 1, Q, K], visible ones
    first, in key order): the kv_num_blocks / kv_indices form of a BlockMask."""
    count = tiles_BQK.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(tiles_BQK.to(torch.int8), dim=-1, descending=True, stable=True)
    return count[:, None], order.to(torch.int32)[:, None]


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """bool mask (True = attend) -> 0 / most-negative float, the form eager attention adds."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(dtype).min)


@dataclass(frozen=True)
class VarlenPlan:
    """What the registered `bdt_attention` function needs to run a causal-per-document kernel."""

    kernel: str  # "varlen" (torch.nn.attention.varlen) | "flash" (flash-attn)
    cu_seqlens: Tensor  # int32 [n_docs+1] over the flattened B*L tokens
    max_seqlen: int


def attention_kwargs(layout: BlockCausalLayout, backend: str,
                     float_dtype: torch.dtype | None = None) -> dict:
    """kwargs for the HF model call (`model(inputs_embeds=..., use_cache=False, **kwargs)`).

    `backend` is a resolved one (sdpa|flex|varlen|flash). For a model running `eager` pass its
    dtype as float_dtype to get the additive mask it needs.
    """
    if backend not in HF_IMPLEMENTATION:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of "
                         f"{', '.join(HF_IMPLEMENTATION)} (resolve 'auto' with resolve_backend)")
    kwargs = {"position_ids": layout.position_ids_BL}
    L = layout.doc_ids_BL.shape[1]
    if backend in ("varlen", "flash") and layout.is_causal:
        cu, max_len = layout.cu_seqlens()
        kwargs.update(attention_mask=None, bdt_varlen_plan=VarlenPlan(backend, cu, max_len))
    elif backend != "sdpa" and L % FLEX_BLOCK == 0:
        kwargs["attention_mask"] = layout.block_mask()
    else:
        kwargs["attention_mask"] = layout.dense_mask(float_dtype)
    return kwargs


# --- KV-cached decoding (method §4: each AR step feeds P tokens against the cache) ---

def decode_attention_mask(key_valid_BK: Tensor, num_new: int,
                          float_dtype: torch.dtype | None = None) -> Tensor:
    """[B, 1, num_new, K + num_new]: the new block sees every valid cached key and itself whole.

    key_valid_BK marks the cached keys that are real (False at left padding); with
    attention_mask=None HF would make the new block causal inside itself, which is wrong here.
    """
    B = key_valid_BK.shape[0]
    new = torch.ones(B, num_new, dtype=torch.bool, device=key_valid_BK.device)
    mask = torch.cat([key_valid_BK.bool(), new], dim=1)[:, None, None, :]
    mask = mask.expand(B, 1, num_new, mask.shape[-1])
    return mask if float_dtype is None else to_additive(mask, float_dtype)


def left_padded_layout(lengths_B: Sequence[int] | Tensor, total_len: int,
                       last_block: int = 1) -> BlockCausalLayout:
    """Prefill rows of the given lengths, left-padded to total_len (e.g. the CFG streams' two
    prompt lengths in one batch): causal, except that each row's last `last_block` tokens form
    one block (the [res_w, queries] block). Each padding token is its own document (it sees only
    itself, so no row is fully masked); real tokens' positions start at 0. The real keys, for
    `decode_attention_mask`, are `layout.doc_ids_BL >= 0`."""
    lengths_B1 = torch.as_tensor(lengths_B).reshape(-1, 1)
    if ((lengths_B1 < last_block) | (lengths_B1 > total_len)).any() or last_block < 1:
        raise ValueError(f"prompt lengths {lengths_B1.reshape(-1).tolist()} must be in "
                         f"[last_block={last_block}, total_len={total_len}]")
    idx_L = torch.arange(total_len)
    pad_B1 = total_len - lengths_B1
    real_BL = idx_L >= pad_B1
    doc_BL = torch.where(real_BL, 0, -1 - idx_L)
    block_BL = idx_L.clamp_max(total_len - last_block).expand_as(doc_BL).clone()
    return BlockCausalLayout(doc_BL, block_BL, (idx_L - pad_B1).clamp_min(0))
