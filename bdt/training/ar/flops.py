"""Model FLOPs of a packed micro-batch and the MFU estimate (issue 6 part 5).

Training FLOPs = 3 x forward (backward ~ 2 x forward). Forward, per packed row, counting only
the work the model needs (padding tokens and masked query-key pairs are not counted, whatever
the kernel computes):
  decoder matmuls   2 x the decoder's weights per token, counted on its modules (q, k, v, o and
                    the MLP's 3 matrices if gated, 2 if not; of MoE experts the routed ones)
  attention         per layer 2 x 2 x heads x head_dim per visible query-key pair (QK^T and AV);
                    the visible pairs of a sample under its block-causal mask (method §4): a
                    causal prefix of c tokens gives c (c + 1) / 2, then every token of a block of
                    P sees all keys up to its block's end. Samples never see each other.
  LM head           2 x hidden x vocab per text-loss position (only those are projected)
  bits connector    2 x connector params per image token
  diffusion head    per image token and per repeat: its forward as torch's FLOP counter counts
                    it (`head_flops_per_token`; 2 x head params is 2-7% off: the time MLP runs
                    once per patch, attention over the P tokens adds pairs)
MFU = achieved model FLOP/s / peak FLOP/s; the peak is configured or measured in this run, on
the device that trains (environment.md: measure it in the same run as any MFU figure).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bdt.model.backbone import decoder_matmul_params


@dataclass
class FlopModel:
    dense_per_token: float  # forward FLOPs of the decoder matmuls per token
    attn_coef: float  # forward attention FLOPs = attn_coef * visible query-key pairs
    lm_head_per_text: float
    head_per_image: float  # diffusion head (all repeats) + bits connector, per image token

    @classmethod
    def from_model(cls, llm, head_params: int, head_repeat: int,
                   connector_params: int = 0) -> FlopModel:
        """The FlopModel of an HF causal LM `llm` (its decoder's weights as built: a gated MLP
        has 3 matrices, GPT-2's or Falcon's 2) and a head of head_params, run head_repeat times."""
        c = llm.config
        d, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
        hd = getattr(c, "head_dim", None) or d // heads
        return cls(dense_per_token=2.0 * decoder_matmul_params(llm),
                   attn_coef=4.0 * layers * heads * hd,
                   lm_head_per_text=2.0 * d * c.vocab_size,
                   head_per_image=2.0 * (head_params * head_repeat + connector_params))

    @classmethod
    def for_model(cls, model) -> FlopModel:
        """The FlopModel of a BitDanceModel, its head counted by `head_flops_per_token`."""
        connector = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.connector.parameters())
        flops = cls.from_model(model.llm, 0, 1, connector)
        flops.head_per_image += head_flops_per_token(model.head.cfg) * model.cfg.head.repeat
        return flops

    def train_flops(self, seq_lens: Sequence[int], text_tokens: int, image_tokens: int,
                    causal_lens: Sequence[int] | None = None,
                    block_sizes: Sequence[int] | None = None) -> float:
        """Training FLOPs of one row of samples of seq_lens tokens; causal_lens / block_sizes
        describe each sample's mask (default: causal throughout)."""
        causal = seq_lens if causal_lens is None else causal_lens
        sizes = [1] * len(seq_lens) if block_sizes is None else block_sizes
        pairs = sum(visible_pairs(n, c, p) for n, c, p in zip(seq_lens, causal, sizes))
        fwd = (self.dense_per_token * sum(seq_lens) + self.attn_coef * pairs
               + self.lm_head_per_text * text_tokens + self.head_per_image * image_tokens)
        return 3.0 * fwd

    def packed_flops(self, packed) -> float:
        """Training FLOPs of a PackedSequence (its samples' lengths, masks and loss positions)."""
        return self.train_flops(packed.cu_seqlens_S1.diff().tolist(),
                                packed.text_target_T.numel(), packed.image_bits_NC.shape[0],
                                packed.causal_len_S.tolist(), packed.block_size_S.tolist())


def head_flops_per_token(head_cfg) -> float:
    """Forward FLOPs of the diffusion head per token, counted by torch on a meta-device copy
    (no memory, no compute; works whatever ZeRO-3 did to the real head)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bdt.model.head import DiffusionHead

    B, P = 8, head_cfg.tokens
    with torch.device("meta"):
        head = DiffusionHead(head_cfg)
        args = (torch.zeros(B, P, head_cfg.bits), torch.zeros(B),
                torch.zeros(B, P, head_cfg.cond_dim))
    with FlopCounterMode(display=False) as counter:
        head(*args)
    return counter.get_total_flops() / (B * P)


def visible_pairs(n: int, causal_len: int, block_size: int) -> int:
    """Query-key pairs visible in one sample of n tokens: causal over its first causal_len, then
    blocks of block_size (full inside, causal across; a shorter last block)."""
    c = min(causal_len, n)
    m, r = divmod(n - c, block_size)  # m full blocks (block j's tokens see c + (j+1) P keys)
    return c * (c + 1) // 2 + block_size * m * c + block_size ** 2 * m * (m + 1) // 2 + r * n


def measure_peak_flops(dtype: torch.dtype, n: int | None = None, seconds: float = 0.5,
                       device: torch.device | str | None = None) -> float:
    """Matmul FLOP/s of this process on `device` (default: CUDA if present, else this process's
    CPU threads) in `dtype`: the MFU denominator. n: the square matrices' side (8192 on CUDA,
    where smaller ones stay below the peak; 1024 on CPU)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = n or (8192 if device.type == "cuda" else 1024)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(n, n, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    b = torch.randn(n, n, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    a @ b  # warm-up (allocations, kernel choice)
    sync()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10 if device.type == "cuda" else 1):  # CUDA: queue a few per check
            a @ b
            reps += 1
        sync()
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)
