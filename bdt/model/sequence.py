"""Sequence layout of the AR model and the training packer (method §2, §4).

One sample (tests/fixtures/bitdance/mllm_tiny.json "batch_layout", which wins over method.md where they
differ) is::

    prompt ids            <|im_start|>user\\n{caption}<|im_end|>\\n<|im_start|>assistant\\n
                          (or <|im_start|>assistant\\n when the caption is dropped, for CFG)
    <|vision_start|> <|res_h|>                       -- still causal
    <|res_w|> <|query_1|> .. <|query_{P-1}|>          -- block 0 (P tokens), predicts patch 0
    patch 0 (P tokens) .. patch G-1                   -- patch k predicts patch k+1

h, w are latent-grid sizes (<|res_k|> = k latent tokens = k*16 px at 16x). No <|vision_end|> is
appended in training (as in the reference layout; generation stops after h*w/P steps). Attention
is causal over the first ``causal_len = len(prompt) + 2`` tokens and block-causal in blocks of P
from <|res_w|> on; samples packed into one sequence never see each other.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bdt.model.text_tokenizer import PromptIds, SpecialTokens

IGNORE_INDEX = -100
# Ids at image positions are placeholders: the model replaces those embeddings (image_mask_L).
IMAGE_PLACEHOLDER_ID = 0


def patch_side(parallel_num: int) -> int:
    """ps with P = ps * ps tokens per patch (P = 1, 4, 16, 64, ...)."""
    ps = math.isqrt(parallel_num)
    if parallel_num < 1 or ps * ps != parallel_num:
        raise ValueError(f"parallel_num (P) must be a perfect square >= 1, got {parallel_num}")
    return ps


def check_grid(h: int, w: int, ps: int, source: str = "latent grid") -> None:
    """ValueError unless an h x w token grid cuts into whole ps x ps patches.

    The release refuses other grids too: its patch-wise rearrange '(h p1) (w p2)' raises, and
    its sampler offers only sizes whose grids divide at P = 64. Padding or partial patches would
    change the sequence layout and the 2D positions of a released model. `source` names where
    the grid came from (a config key, a sample), so callers can refuse it before any packing.
    """
    if h < 1 or w < 1 or h % ps or w % ps:
        raise ValueError(
            f"{source} {h}x{w} is not divisible by the patch side {ps} (P = {ps * ps}); "
            f"image sides must be multiples of {ps} latent tokens"
        )


def patch_raster_perm(h: int, w: int, ps: int) -> torch.Tensor:
    """perm[i] = row-major index (r*w + c) of the i-th token in sequence order.

    Patches of ps x ps go in raster order, tokens inside a patch in raster order too (method §4;
    BitDance's rearrange 'c (h p1) (w p2) -> (h w p1 p2) c').
    """
    check_grid(h, w, ps)
    idx_HW = torch.arange(h * w).view(h // ps, ps, w // ps, ps)
    return idx_HW.permute(0, 2, 1, 3).reshape(-1)


def inverse_perm(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return inv


def grid_coords(h: int, w: int, ps: int) -> torch.Tensor:
    """[h*w, 2] (row, col) of each token in sequence order."""
    perm = patch_raster_perm(h, w, ps)
    return torch.stack([perm // w, perm % w], dim=1)


def to_sequence_order(bits_HWC: torch.Tensor, ps: int) -> torch.Tensor:
    """[h, w, C] grid -> [h*w, C] tokens in patch-wise raster order."""
    h, w, c = bits_HWC.shape
    return bits_HWC.reshape(h * w, c)[patch_raster_perm(h, w, ps)]


def from_sequence_order(tokens_NC: torch.Tensor, h: int, w: int, ps: int) -> torch.Tensor:
    """Inverse of `to_sequence_order`: [h*w, C] sequence-order tokens -> [h, w, C] grid."""
    inv = inverse_perm(patch_raster_perm(h, w, ps))
    return tokens_NC[inv].reshape(h, w, tokens_NC.shape[-1])


@dataclass(frozen=True)
class ImageSample:
    """One training pair: caption (text, caption token ids, or None = unconditional) + bit grid."""

    caption: str | Sequence[int] | None
    bits_HWC: torch.Tensor  # +-1 floats, latent grid h x w, C bits per token (row-major grid)


@dataclass
class PackedSequence:
    """S samples packed into one sequence of L tokens with N image tokens in total.

    Everything the AR model, the attention facade and the losses need; index tensors are int64
    positions into the packed sequence unless said otherwise.
    """

    input_ids_L: torch.Tensor  # token ids; IMAGE_PLACEHOLDER_ID at image positions
    image_mask_L: torch.Tensor  # bool, True at the N image-token positions
    image_bits_NC: torch.Tensor  # clean +-1 bits of the image tokens, in sequence order;
    #   also the vision-loss targets (token n is predicted from vision_loss_index_N[n])
    image_rc_N2: torch.Tensor  # (row, col) latent coordinates of each image token (2D pos-emb,
    #   used for the token's own LLM input AND for the head condition that predicts it)
    position_ids_L: torch.Tensor  # 1D RoPE positions, restarting at 0 for every sample
    cu_seqlens_S1: torch.Tensor  # int32 [S+1] cumulative sample lengths (document boundaries)
    causal_len_S: torch.Tensor  # tokens at the start of each sample that are plainly causal
    #   (prompt + <|vision_start|> + <|res_h|>); after them, blocks of block_size_S tokens
    block_size_S: torch.Tensor  # P of each sample (all equal within one model)
    text_loss_index_T: torch.Tensor  # positions whose logits are scored by the text CE:
    #   every prompt token (the last one predicts <|vision_start|>)
    text_target_T: torch.Tensor  # the target id for each of them (the next token)
    vision_loss_index_N: torch.Tensor  # hidden state predicting image token n: block 0
    #   ([res_w, queries]) predicts patch 0, the block of patch k predicts patch k+1
    grid_hw_S2: torch.Tensor  # latent grid (h, w) of each sample
    unconditional_S: torch.Tensor  # bool, sample uses the unconditional prefix (caption None or
    #   dropped for CFG)

    @property
    def labels_L(self) -> torch.Tensor:
        """HF-style causal-LM labels (unshifted): -100 except the text-CE targets.

        labels[i+1] = target of position i, so each sample's first label is -100 and the HF
        shift never scores a prediction across a sample boundary (environment.md).
        """
        labels_L = torch.full_like(self.input_ids_L, IGNORE_INDEX)
        labels_L[self.text_loss_index_T + 1] = self.text_target_T
        return labels_L

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens_S1.numel() - 1


class SequencePacker:
    """Builds prompt/image-prefix ids and packs `ImageSample`s for one model configuration.

    ``encode_text`` maps a caption string to ids (e.g. ``text_tokenizer.encode`` bound to the
    tokenizer); captions given as ids skip it. ``max_len`` caps each sample's length.
    """

    def __init__(
        self,
        special: SpecialTokens,
        prompt: PromptIds,
        parallel_num: int,
        max_len: int,
        caption_dropout: float = 0.0,
        encode_text: Callable[[str], list[int]] | None = None,
    ) -> None:
        self.ps = patch_side(parallel_num)
        if len(special.query_ids) != parallel_num - 1:
            raise ValueError(
                f"special tokens hold {len(special.query_ids)} query tokens, but P = {parallel_num} "
                f"needs {parallel_num - 1}"
            )
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
        self.special, self.prompt, self.parallel_num = special, prompt, parallel_num
        self.max_len, self.caption_dropout, self.encode_text = max_len, caption_dropout, encode_text

    def prompt_ids(self, caption: str | Sequence[int] | None) -> list[int]:
        """Chat-template prefix ids: conditional for a caption, unconditional for None."""
        if isinstance(caption, str):
            if self.encode_text is None:
                raise ValueError("caption given as text but the packer has no encode_text")
            caption = self.encode_text(caption)
        return self.prompt.build(caption)

    def image_prefix_ids(self, h: int, w: int) -> list[int]:
        """[<|vision_start|>, <|res_h|>, <|res_w|>, <|query_1|> .. <|query_{P-1|>] for an h x w grid."""
        check_grid(h, w, self.ps)
        sp = self.special
        return [sp.vision_start, sp.res(h), sp.res(w), *sp.query_ids]

    def sample_len(self, n_prompt: int, h: int, w: int) -> int:
        """Tokens of one packed sample with a prompt of ``n_prompt`` ids (for token budgets)."""
        return n_prompt + 2 + self.parallel_num + h * w

    def _checked_prompt(self, caption: str | Sequence[int] | None, h: int, w: int, i: int) -> list[int]:
        ids = self.prompt_ids(caption)
        total = self.sample_len(len(ids), h, w)
        if total > self.max_len:
            raise ValueError(
                f"sample {i}: prompt of {len(ids)} tokens + {2 + self.parallel_num} image-prefix "
                f"tokens + {h * w} image tokens ({h}x{w}) = {total} > max_len {self.max_len}"
            )
        return ids

    def pack(self, samples: Sequence[ImageSample], generator: torch.Generator | None = None) -> PackedSequence:
        """Pack ``samples`` into one sequence; captions are dropped with prob ``caption_dropout``.

        ``generator`` seeds the dropout draws (one uniform per sample, in order).
        """
        if not samples:
            raise ValueError("pack() needs at least one sample")
        P = self.parallel_num
        drop_S = torch.rand(len(samples), generator=generator) < self.caption_dropout
        # Python per sample only for the ids; every tensor is built for the whole row at once
        # (a 16k-token row holds ~190 images at 64 px: per-sample tensor ops took ~25 ms).
        heads, prompt_lens, grids, uncond, bit_grids = [], [], [], [], []
        n_bits = None
        for i, s in enumerate(samples):
            bits_HWC = torch.as_tensor(s.bits_HWC)
            if bits_HWC.dim() != 3:
                raise ValueError(f"sample {i}: bits must be [h, w, C], got shape {tuple(bits_HWC.shape)}")
            h, w, c = bits_HWC.shape
            n_bits = c if n_bits is None else n_bits
            if c != n_bits:
                raise ValueError(f"sample {i}: {c} bits per token, sample 0 has {n_bits}")
            check_grid(h, w, self.ps, f"sample {i}: latent grid")
            caption = None if drop_S[i] else s.caption
            prompt = self._checked_prompt(caption, h, w, i)
            heads.append(prompt + self.image_prefix_ids(h, w))
            prompt_lens.append(len(prompt))
            grids.append((h, w))
            uncond.append(caption is None)
            bit_grids.append(bits_HWC)

        head_len_S = np.array([len(h) for h in heads])
        T_S = np.array(prompt_lens)
        n_img_S = np.array([h * w for h, w in grids])
        len_S = head_len_S + n_img_S
        offset_S = np.cumsum(len_S) - len_S  # each sample's first position in the row
        img_start_S = offset_S + head_len_S
        L, N = int(len_S.sum()), int(n_img_S.sum())
        img_first_S = np.cumsum(n_img_S) - n_img_S  # each sample's first image token (of N)

        head_pos = _ranges(offset_S, head_len_S)
        input_ids_L = np.full(L, IMAGE_PLACEHOLDER_ID, dtype=np.int64)
        input_ids_L[head_pos] = list(itertools.chain.from_iterable(heads))
        image_mask_L = np.ones(L, dtype=bool)
        image_mask_L[head_pos] = False
        bits_NC = torch.empty(N, n_bits)
        rc_N2 = torch.empty(N, 2, dtype=torch.int64)
        for (h, w), members in _group_by(grids).items():  # tokens in patch-raster order
            dest = torch.from_numpy(_ranges(img_first_S[members], n_img_S[members]))
            grid_kHWC = torch.stack([bit_grids[i] for i in members]).float()
            bits_NC[dest] = grid_kHWC.reshape(len(members), h * w, n_bits)[
                :, patch_raster_perm(h, w, self.ps)].reshape(-1, n_bits)
            rc_N2[dest] = grid_coords(h, w, self.ps).repeat(len(members), 1)
        if not bool((bits_NC.abs() == 1).all()):
            first = int((bits_NC.abs() != 1).any(dim=1).nonzero()[0])
            i = int(np.searchsorted(img_first_S, first, side="right")) - 1
            raise ValueError(f"sample {i}: image bits must be +-1 floats")
        # Every prompt token predicts its successor; the last one predicts <|vision_start|>.
        text_target_T = list(itertools.chain.from_iterable(h[1:T + 1]
                                                           for h, T in zip(heads, prompt_lens)))
        return PackedSequence(
            input_ids_L=torch.from_numpy(input_ids_L),
            image_mask_L=torch.from_numpy(image_mask_L),
            image_bits_NC=bits_NC,
            image_rc_N2=rc_N2,
            position_ids_L=torch.from_numpy(np.arange(L) - np.repeat(offset_S, len_S)),
            cu_seqlens_S1=torch.tensor([0, *itertools.accumulate(len_S.tolist())],
                                       dtype=torch.int32),
            causal_len_S=torch.from_numpy(T_S + 2),
            block_size_S=torch.full((len(samples),), P),
            text_loss_index_T=torch.from_numpy(_ranges(offset_S, T_S)),
            text_target_T=torch.tensor(text_target_T, dtype=torch.int64),
            # Image token n sits at img_start + n; it is predicted one block (P tokens) earlier,
            # which for n < P is the [res_w, queries] block right before the image.
            vision_loss_index_N=torch.from_numpy(_ranges(img_start_S - P, n_img_S)),
            grid_hw_S2=torch.tensor(grids),
            unconditional_S=torch.tensor(uncond),
        )


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concat(arange(s, s + n) for s, n in zip(starts, lengths)), int64, without a Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    firsts = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(
        np.asarray(starts, dtype=np.int64) - firsts, lengths)


def _group_by(keys: list) -> dict:
    """key -> indices (an int64 array) of the positions holding it, keys in first-seen order."""
    out: dict = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return {k: np.array(v, dtype=np.int64) for k, v in out.items()}
