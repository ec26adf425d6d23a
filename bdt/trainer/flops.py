"""Model FLOPs of a packed micro-batch and the MFU estimate (issue 6 part 5).

Training FLOPs = 3 x forward (backward ~ 2 x forward). Forward, per packed row:
  decoder matmuls   2 x (q, k, v, o and SwiGLU weights) per token
  attention         per layer 2 x 2 x heads x head_dim x L_s (L_s + 1) / 2 for each packed sample s
                    (QK^T and AV under the causal mask, over the sample's own length only, since
                    packed samples do not attend to each other)
  LM head           2 x hidden x vocab per text-loss position (only those are projected)
  diffusion head    2 x head params per image token and per repeat
MFU = achieved model FLOP/s / peak FLOP/s; the peak is configured or measured in this run
(environment.md: measure it in the same run as any MFU figure).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass
class FlopModel:
    dense_per_token: float  # forward FLOPs of the decoder matmuls per token
    attn_coef: float  # forward attention FLOPs = attn_coef * sum_s L_s (L_s + 1) / 2
    lm_head_per_text: float
    head_per_image: float

    @classmethod
    def from_model(cls, llm_config, head_params: int, head_repeat: int) -> FlopModel:
        c = llm_config
        d, layers = c.hidden_size, c.num_hidden_layers
        heads, kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        hd = getattr(c, "head_dim", None) or d // heads
        per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * c.intermediate_size
        return cls(dense_per_token=2.0 * layers * per_layer, attn_coef=4.0 * layers * heads * hd,
                   lm_head_per_text=2.0 * d * c.vocab_size,
                   head_per_image=2.0 * head_params * head_repeat)

    def train_flops(self, seq_lens: list[int], text_tokens: int, image_tokens: int) -> float:
        tokens = sum(seq_lens)
        attn = self.attn_coef * sum(n * (n + 1) / 2 for n in seq_lens)
        fwd = (self.dense_per_token * tokens + attn + self.lm_head_per_text * text_tokens
               + self.head_per_image * image_tokens)
        return 3.0 * fwd


def measure_peak_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.5) -> float:
    """Matmul FLOP/s of this process (its thread count and dtype): the MFU denominator."""
    a = torch.randn(n, n, dtype=dtype, generator=torch.Generator().manual_seed(0))
    b = torch.randn(n, n, dtype=dtype, generator=torch.Generator().manual_seed(1))
    a @ b  # warm-up (allocations, kernel choice)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)
