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
        ids, img_mask, bits, rcs, vis_idx, txt_idx, txt_tgt = [], [], [], [], [], [], []
        pos, lens, causal, grids, uncond = [], [], [], [], []
        offset, n_bits = 0, None
        for i, s in enumerate(samples):
            bits_HWC = torch.as_tensor(s.bits_HWC)
            if bits_HWC.dim() != 3:
                raise ValueError(f"sample {i}: bits must be [h, w, C], got shape {tuple(bits_HWC.shape)}")
            h, w, c = bits_HWC.shape
            n_bits = c if n_bits is None else n_bits
            if c != n_bits:
                raise ValueError(f"sample {i}: {c} bits per token, sample 0 has {n_bits}")
            check_grid(h, w, self.ps, f"sample {i}: latent grid")
            if not bool((bits_HWC.abs() == 1).all()):
                raise ValueError(f"sample {i}: image bits must be +-1 floats")
            caption = None if drop_S[i] else s.caption
            prompt = self._checked_prompt(caption, h, w, i)
            head = prompt + self.image_prefix_ids(h, w)
            T, n_img = len(prompt), h * w
            L = len(head) + n_img
            img_start = offset + len(head)

            ids.append(torch.tensor(head + [IMAGE_PLACEHOLDER_ID] * n_img))
            img_mask.append(torch.arange(L) >= len(head))
            bits.append(to_sequence_order(bits_HWC.float(), self.ps))
            rcs.append(grid_coords(h, w, self.ps))
            # Image token n sits at img_start + n; it is predicted one block (P tokens) earlier,
            # which for n < P is the [res_w, queries] block right before the image.
            vis_idx.append(img_start + torch.arange(n_img) - P)
            # Every prompt token predicts its successor; the last one predicts <|vision_start|>.
            txt_idx.append(offset + torch.arange(T))
            txt_tgt.append(torch.tensor(head[1 : T + 1]))
            pos.append(torch.arange(L))
            lens.append(L)
            causal.append(T + 2)
            grids.append((h, w))
            uncond.append(caption is None)
            offset += L

        return PackedSequence(
            input_ids_L=torch.cat(ids),
            image_mask_L=torch.cat(img_mask),
            image_bits_NC=torch.cat(bits),
            image_rc_N2=torch.cat(rcs),
            position_ids_L=torch.cat(pos),
            cu_seqlens_S1=torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32),
            causal_len_S=torch.tensor(causal),
            block_size_S=torch.full((len(samples),), P),
            text_loss_index_T=torch.cat(txt_idx),
            text_target_T=torch.cat(txt_tgt),
            vision_loss_index_N=torch.cat(vis_idx),
            grid_hw_S2=torch.tensor(grids),
            unconditional_S=torch.tensor(uncond),
        )
