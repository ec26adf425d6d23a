"""The attention facade: one description of a packed sequence's mask, realised by several backends.

A packed row of L tokens holds several samples ("documents"). Each token carries a document id and
a block id, non-decreasing along the row; key j is visible to query i iff both are in the same
document and block[j] <= block[i]. Text tokens are blocks of one (causal); image tokens come in
blocks of P (full inside a block, causal across blocks): the block-causal mask of method §4.
Callers describe a row as cumulative sample lengths + per sample (causal_len, P)
(`BlockCausalLayout.from_packed`) and get the Hugging Face model kwargs from `attention_kwargs`.
A backbone's sliding-window or chunked layers narrow that rule further (`LayerRule`): one mask
per distinct rule, handed to the model as transformers' dict of masks per layer type.

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
from collections.abc import Mapping, Sequence
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
_UNBOUNDED = 1 << 62  # a window or chunk no position reaches
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
            if size is not None and (not isinstance(size, int) or size < 1):
                raise ValueError(f"attention {name} must be a whole number >= 1, got {size!r}")


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
    (`bdt.model.backbone.layer_rules`); one rule gives one mask for every layer, several a dict
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


# --- KV-cached decoding (method §4: each AR step feeds P tokens against the cache) ---

def decode_attention_mask(key_valid_BK: Tensor, num_new: int,
                          float_dtype: torch.dtype | None = None,
                          rule: LayerRule = FULL) -> Tensor:
    """[B, 1, num_new, K + num_new]: the new block sees every valid cached key and itself whole,
    as far as a layer's `rule` lets it (the rule of training's masks, on the same positions).

    key_valid_BK marks the cached keys that are real (False at left padding, before them);
    with attention_mask=None HF would make the new block causal inside itself, which is wrong.
    """
    valid_BK = key_valid_BK.bool()
    (B, K), device = valid_BK.shape, valid_BK.device
    idx_L = torch.arange(K + num_new, device=device)
    real_BL = torch.cat([valid_BK, torch.ones(B, num_new, dtype=torch.bool, device=device)], 1)
    layout = BlockCausalLayout(torch.where(real_BL, 0, -1 - idx_L),  # padding: its own docs
                               idx_L.clamp_max(K).expand(B, -1),  # the new tokens: one block
                               (real_BL.cumsum(1) - 1).clamp_min(0))
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
