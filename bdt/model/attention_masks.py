"""The block-causal mask of a packed sequence, as one rule every attention backend realises.

A packed row of L tokens holds several samples ("documents"). Each token carries a document id and
a block id, non-decreasing along the row; key j is visible to query i iff both are in the same
document and block[j] <= block[i]. Text tokens are blocks of one (causal); image tokens come in
blocks of P (full inside a block, causal across blocks): the block-causal mask of method §4.
Callers describe a row as cumulative sample lengths + per sample (causal_len, P)
(`BlockCausalLayout.from_packed`); the layout gives the rule as a dense mask, a flex BlockMask
or document boundaries, and `bdt.model.attention` hands the form its backend takes to the model.
A backbone's sliding-window or chunked layers narrow that rule further (`LayerRule`). KV-cached
decoding and its left-padded prefill rows have their masks here too (`decode_attention_mask`,
`left_padded_layout`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FLEX_BLOCK = 128  # flex_attention's sparse block size (_DEFAULT_SPARSE_BLOCK_SIZE)
_UNBOUNDED = 1 << 62  # a window or chunk no position reaches
# The largest window or chunk: the kernels take window_size as a C int, and a size past int64
# wrapped in the masks' comparisons (2^63: every key masked, no error).
MAX_LOCAL_SIZE = 2**31 - 1
_MASK_CHUNK_PAIRS = 1 << 24  # query-key pairs evaluated at once while building a BlockMask


@dataclass(frozen=True)
class LayerRule:
    """What a layer type adds to the block-causal rule, from the backbone's config (method §2):
    `window` (sliding attention): query i sees key j only if pos[i] - pos[j] < window; `chunk`
    (chunked attention): only if pos[i] // chunk == pos[j] // chunk; neither: full attention.
    Positions restart at each sample (HF's chunks also start after the left padding).

    The window is measured from the query itself, as Hugging Face's sliding_window_overlay
    (`kv_idx > q_idx - sliding_window`) is: with P = 1 it is HF's causal window exactly, and in
    a block it is HF's rule for Gemma 3's bidirectional image blocks (Gemma 3's
    create_masks_for_vision_model: AND(window, OR(causal, block))): the block's later keys stay
    visible, its earlier ones and the keys before it only within the window."""

    window: int | None = None
    chunk: int | None = None

    def __post_init__(self):
        for name in ("window", "chunk"):
            size = getattr(self, name)
            if size is not None and not (isinstance(size, int) and 1 <= size <= MAX_LOCAL_SIZE):
                raise ValueError(f"attention {name} must be a whole number >= 1 and < 2^31, got "
                                 f"{size!r}")


FULL = LayerRule()


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

    def visible(self, queries: slice = slice(None), rule: LayerRule = FULL) -> Tensor:
        """bool [B, Q, L]: [b, i, j] = key j visible to query i (all queries, or a slice)."""
        d, k, p = self.doc_ids_BL, self.block_ids_BL, self.position_ids_BL
        dq, kq, pq = d[:, queries, None], k[:, queries, None], p[:, queries, None]
        return _rule_holds(rule, pq, p[:, None, :], (dq == d[:, None, :]) & (k[:, None, :] <= kq))

    def dense_mask(self, float_dtype: torch.dtype | None = None,
                   rule: LayerRule = FULL) -> Tensor:
        """[B, 1, L, L]: bool (True = attend), or additive float of float_dtype (for eager)."""
        mask = self.visible(rule=rule)[:, None]
        return mask if float_dtype is None else to_additive(mask, float_dtype)

    def mask_mod(self, rule: LayerRule | None = None):
        """flex_attention mask_mod implementing `visible` (no tensors materialised). Given a rule
        (FULL too), its sizes are tensors, not constants: every layer type of a backbone with
        local layers then shares one compiled flex graph per row length."""
        doc, block, pos = self.doc_ids_BL, self.block_ids_BL, self.position_ids_BL

        def visible(b, h, q_idx, kv_idx):
            return (doc[b, q_idx] == doc[b, kv_idx]) & (block[b, kv_idx] <= block[b, q_idx])
        if rule is None:
            return visible
        window, chunk = (torch.tensor(size or _UNBOUNDED, device=pos.device)
                         for size in (rule.window, rule.chunk))

        def visible_locally(b, h, q_idx, kv_idx):
            pq, pk = pos[b, q_idx], pos[b, kv_idx]
            return visible(b, h, q_idx, kv_idx) & (pq - pk < window) & (pq // chunk == pk // chunk)
        return visible_locally

    def block_mask(self, device: torch.device | str | None = None,
                   rule: LayerRule | None = None):
        """A flex_attention BlockMask [B, 1, L, L] of the same mask (narrowed by `rule`, see
        `mask_mod`); L a multiple of FLEX_BLOCK.

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
            tiles = layout.visible(slice(q0, q0 + step), rule or FULL).view(
                B, -1, FLEX_BLOCK, n, FLEX_BLOCK)
            some.append(tiles.any(dim=4).any(dim=2))
            full.append(tiles.all(dim=4).all(dim=2))
        full_BQK = torch.cat(full, dim=1)
        partial_BQK = torch.cat(some, dim=1) & ~full_BQK
        return BlockMask.from_kv_blocks(*_ordered_blocks(partial_BQK), *_ordered_blocks(full_BQK),
                                        BLOCK_SIZE=FLEX_BLOCK, mask_mod=layout.mask_mod(rule),
                                        seq_lengths=(L, L))

    def cu_seqlens(self, chunk: int | None = None) -> tuple[Tensor, int]:
        """Document boundaries over the flattened rows (int32 [n_docs+1]) and the longest doc;
        with `chunk`, every chunk of a document counts as a document of its own."""
        d = self.doc_ids_BL
        if chunk is not None:  # ids never repeat across documents: pair them with the chunk
            d = d * (self.position_ids_BL.max() + 1) + self.position_ids_BL // chunk
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


def _rule_holds(rule: LayerRule, pos_q: Tensor, pos_k: Tensor, visible: Tensor) -> Tensor:
    """`visible` narrowed by a layer's window or chunk (positions broadcast like it)."""
    if rule.window is not None:
        visible = visible & (pos_q - pos_k < rule.window)
    if rule.chunk is not None:
        visible = visible & (pos_q // rule.chunk == pos_k // rule.chunk)
    return visible


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


# --- KV-cached decoding (method §4: each AR step feeds P tokens against the cache) ---

def decode_attention_mask(key_valid_BK: Tensor, num_new: int,
                          float_dtype: torch.dtype | None = None,
                          rule: LayerRule = FULL, dropped_B: Tensor | None = None) -> Tensor:
    """[B, 1, num_new, K + num_new]: the new block sees every valid cached key and itself whole,
    as far as a layer's `rule` lets it (the rule of training's masks, on the same positions).

    key_valid_BK marks the cached keys that are real (False at left padding, before them);
    with attention_mask=None HF would make the new block causal inside itself, which is wrong.
    dropped_B: each row's real keys before those (a bounded cache dropped them), which the
    positions count on from: chunks are cut at absolute positions.
    """
    valid_BK = key_valid_BK.bool()
    (B, K), device = valid_BK.shape, valid_BK.device
    idx_L = torch.arange(K + num_new, device=device)
    real_BL = torch.cat([valid_BK, torch.ones(B, num_new, dtype=torch.bool, device=device)], 1)
    pos_BL = real_BL.cumsum(1) - 1 + (0 if dropped_B is None else dropped_B.reshape(B, 1))
    layout = BlockCausalLayout(torch.where(real_BL, 0, -1 - idx_L),  # padding: its own docs
                               idx_L.clamp_max(K).expand(B, -1),  # the new tokens: one block
                               pos_BL.clamp_min(0))
    mask = layout.visible(slice(K, None), rule)[:, None]
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
