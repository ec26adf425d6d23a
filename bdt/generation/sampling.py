"""Text-to-bits generation with next-patch diffusion (method §3-4, issue 4 part 7).

For a batch of prompts and one bucket (h x w latent tokens, both divisible by ps):
1. Prefill every prompt's prefix, chat template + <|vision_start|> <|res_h|> <|res_w|> + P-1
   query tokens, causal except the last P tokens ([res_w, queries]), which form one block.
   With CFG the unconditional prefixes (<|im_start|>assistant\\n + the same image part) ride in
   the same batch: rows are left-padded to one length, padding is masked out and each row's
   RoPE positions start at its first real token (exact, environment.md).
2. The last block's P hidden states + the 2D pos-emb of patch k's tokens condition the head,
   which samples patch k for all rows at once (Euler-Maruyama, CFG on the velocity, a constant
   or a linearly rising scale over the AR steps); bits = x >= 0.
3. Patch k's bits are embedded (connector + pos2d) and fed to both streams as the next block of
   P tokens against the KV cache, with an explicit [R,1,P,past+P] mask so the block sees itself
   whole (HF's default would make it causal), one per layer type where the backbone has sliding
   or chunked layers (training's windows). Repeat for h*w/P steps.

`use_cache=False` recomputes the whole sequence at every step under the block-causal mask: the
reference that proves the cache (same seed => same bits, in fp32: in bf16 the cache's and the
full pass's roundings differ, and a flipped bit changes every later patch). All randomness is in
the head sampler, drawn from one seeded generator in a fixed order, so the result is
reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bdt.model.ar import BitDanceModel
from bdt.model.attention_masks import BlockCausalLayout
from bdt.model.flow import binarize, cfg_schedule, sample
from bdt.model.sequence import SequencePacker, from_sequence_order, grid_coords
from bdt.model.text_tokenizer import encode_user_text


@dataclass
class SamplingConfig:
    cfg_scale: float = 7.5  # method §3: T2I 7.5 (13 for GenEval); 1.0 = no unconditional stream
    cfg_schedule: str = "constant"  # constant | linear (rising to cfg_scale over the AR steps)
    num_steps: int = 50  # Euler-Maruyama steps of the head per AR step (25 is faster)
    time_shift: float | None = None  # None: the head's own
    seed: int = 0
    use_cache: bool = True  # False: full recomputation per step (slow; the cache's reference)


class PromptError(ValueError):
    """A prompt sampling cannot take: `index` is its place in the prompts (from 0), `reason` what
    is wrong. The message counts from 1, as people do (and `--prompt number N`); a command
    names the prompt its own way (a file's line, a suite item's id)."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"prompt {index + 1}: {reason}")
        self.index, self.reason = index, reason


def _prefixes(model: BitDanceModel, prompts: Sequence[str | Sequence[int]], h: int, w: int,
              guided: bool) -> list[list[int]]:
    """Prefix ids per row: the B conditional rows, then (guided) B unconditional ones."""
    if model.special is None or model.prompt is None:
        raise ValueError("generation needs the model's special tokens and prompt pieces "
                         "(build it with BitDanceModel.from_config / from_pretrained)")
    if not prompts:
        raise ValueError("generate() needs at least one prompt")
    context = model.llm.config.max_position_embeddings
    encode_text = None if model.tokenizer is None else (
        lambda s: encode_user_text(model.tokenizer, s))
    packer = SequencePacker(model.special, model.prompt, model.cfg.parallel_num,
                            max_len=context, encode_text=encode_text)
    image_part = packer.image_prefix_ids(h, w)  # checks h, w against the patch side
    if max(h, w) > model.pos_embed.max_grid:
        raise ValueError(f"bucket {h}x{w} tokens exceeds the 2D position table "
                         f"({model.pos_embed.max_grid} tokens per side)")
    captions = list(prompts) + ([None] * len(prompts) if guided else [])
    rows = []
    for i, caption in enumerate(captions):
        _check_text(caption, i % len(prompts))
        ids = packer.prompt_ids(caption)
        total = packer.sample_len(len(ids), h, w)
        if total > context:
            raise PromptError(i % len(prompts), f"{len(ids)} prompt tokens + {total - len(ids)} "
                              f"image-part tokens ({h}x{w} bucket) = {total} > the model's "
                              f"context of {context} positions")
        rows.append(ids + image_part)
    return rows


def _check_text(caption: str | Sequence[int] | None, i: int) -> None:
    """A prompt that is no UTF-8 text (a lone surrogate: bytes of another encoding in argv, a
    \\ud800 escape in a suite file) fails the tokenizer with a bare TypeError: name it."""
    if isinstance(caption, str):
        try:
            caption.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(i, f"not UTF-8 text ({e.reason}: {caption[e.start]!r} at "
                                 f"character {e.start})") from None


def check_prompts(model: BitDanceModel, prompts: Sequence[str | Sequence[int]], h: int,
                  w: int) -> None:
    """PromptError naming the first prompt that an h x w bucket's sampling cannot take, so a
    long list fails before its first batch rather than midway."""
    _prefixes(model, prompts, h, w, guided=False)


def _layout(lengths: Sequence[int], total: int, prefix_total: int, P: int) -> BlockCausalLayout:
    """Rows right-aligned at `prefix_total` (left padding), then (total - prefix_total) image
    tokens: each row causal over its prefix minus the last P tokens, then blocks of P. The padding
    is its own document, invisible to the real tokens, whose positions start at 0."""
    rows = []
    for n in lengths:
        pad = prefix_total - n
        rows.append(BlockCausalLayout.from_packed([0, pad, total], [pad, n - P], [1, P]))
    return BlockCausalLayout.stack(rows)


@torch.no_grad()
def generate(model: BitDanceModel, prompts: Sequence[str | Sequence[int]], h: int, w: int,
             cfg: SamplingConfig | None = None) -> Tensor:
    """Sample one h x w bit grid per prompt (text, or caption token ids): bool [B, h, w, C]."""
    cfg = cfg or SamplingConfig()
    _check(cfg, prompts)
    guided = cfg.cfg_scale != 1.0
    rows = _prefixes(model, prompts, h, w, guided)  # validates prompts, bucket and context
    P, ps = model.cfg.parallel_num, model.cfg.patch_size
    n_steps = h * w // P
    scales = cfg_schedule(cfg.cfg_scale, n_steps, cfg.cfg_schedule)
    was_training = model.training
    model.eval()
    try:
        bits_BNC = _decode(model, rows, len(prompts), h, w, scales, cfg)
    finally:
        model.train(was_training)
    return torch.stack([from_sequence_order(b, h, w, ps) for b in bits_BNC]) > 0


def _check(cfg: SamplingConfig, prompts) -> None:
    """ValueError for settings no sampling can use (the CLI checks its own flags; API callers
    come here); TypeError for one prompt given as a string (it would be one per character)."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("prompts must be a sequence of prompts, not one string: wrap it, [prompt]")
    if not (0 <= cfg.cfg_scale < float("inf")) or cfg.num_steps < 1 or \
            (cfg.time_shift is not None and not 0 < cfg.time_shift < float("inf")):
        raise ValueError(f"sampling settings: cfg_scale must be finite and >= 0, num_steps >= 1 "
                         f"and time_shift finite and > 0; got {cfg.cfg_scale}, {cfg.num_steps}, "
                         f"{cfg.time_shift}")


def _decode(model: BitDanceModel, rows: list[list[int]], B: int, h: int, w: int,
            scales: list[float], cfg: SamplingConfig) -> Tensor:
    """The AR loop over h*w/P steps; rows = B conditional (+ B unconditional) prefixes.
    Returns the sampled +-1 tokens in sequence order, [B, h*w, C]."""
    P, R, device = model.cfg.parallel_num, len(rows), model.llm.device
    lengths = [len(r) for r in rows]
    L0 = max(lengths)
    ids_RL = torch.tensor([[0] * (L0 - n) + r for n, r in zip(lengths, rows)], device=device)
    lengths_R1 = torch.tensor(lengths, device=device)[:, None]
    key_valid_RK = torch.arange(L0, device=device) >= L0 - lengths_R1  # False at left padding
    next_pos_R1 = lengths_R1
    rc_N2 = grid_coords(h, w, model.cfg.patch_size).to(device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    # The explicit masks apply the windows and chunks, as in training; a local layer's cache
    # keeps only the keys they can still show (its mask is sized to them: model.decode_mask).
    cache = model.kv_cache() if cfg.use_cache else None

    embeds_RLD = model.embed_text(ids_RL)  # the whole sequence so far (uncached mode)
    new_RPD = embeds_RLD
    tokens = []
    for k in range(len(scales)):
        if cache is None or k == 0:
            # Step 0 is the prefill (both modes); uncached steps re-run the whole sequence.
            layout = _layout(lengths, embeds_RLD.shape[1], L0, P)
            hidden = model.decoder(inputs_embeds=embeds_RLD, past_key_values=cache,
                                   use_cache=cache is not None, **model.mask_kwargs(layout)
                                   ).last_hidden_state
        else:
            hidden = model.decoder(inputs_embeds=new_RPD, past_key_values=cache, use_cache=True,
                                   attention_mask=model.decode_mask(key_valid_RK, P),
                                   position_ids=next_pos_R1 + torch.arange(P, device=device)
                                   ).last_hidden_state
            key_valid_RK = torch.cat([key_valid_RK, torch.ones_like(key_valid_RK[:, :P])], 1)
            next_pos_R1 = next_pos_R1 + P
        if cache is not None:
            cache.drop_unseen(key_valid_RK)
        rc_P2 = rc_N2[k * P:(k + 1) * P]
        cond_RPD = model.head_condition(hidden[:, -P:], rc_P2)  # pos [P, D] over rows
        x_BPC = sample(model.head, cond_RPD[:B], cond_RPD[B:] if R > B else None,
                       cfg_scale=scales[k], num_steps=cfg.num_steps, time_shift=cfg.time_shift,
                       generator=generator)
        if not bool(torch.isfinite(x_BPC).all()):  # binarize would make NaN a plausible -1
            raise FloatingPointError(f"sampling produced NaN or inf at AR step {k}: the model's "
                                     f"weights or the sampling settings are not usable")
        bits_BPC = binarize(x_BPC)
        tokens.append(bits_BPC)
        if k + 1 < len(scales):
            bits_RPC = bits_BPC.repeat(R // B, 1, 1)  # both streams get the sampled patch
            new_RPD = model.embed_image(bits_RPC.reshape(R * P, -1), rc_P2.repeat(R, 1)
                                        ).view(R, P, -1).to(embeds_RLD.dtype)
            if cache is None:
                embeds_RLD = torch.cat([embeds_RLD, new_RPD], dim=1)
    return torch.cat(tokens, dim=1)
