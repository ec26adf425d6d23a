"""Sign quantizer with straight-through gradients and its training losses (method §1).

Each encoder channel becomes one bit: +1 where z > 0, else -1 (strict, so an exact 0 is -1, as in
the release). There is no codebook lookup; for the entropy loss the C bits are split into
contiguous groups of `g` channels, and every group is scored against its 2**g implicit codes
(lookup-free quantization, as BitDance's GFQ). Code index of a group = sum_k bit_k * 2**k with k
the channel offset inside the group (LSB first); code row j has entries ((j >> k) & 1) * 2 - 1.

Losses (the intended formulas; the released GFQ averages its commitment term over a subset of
batch rows by accident, see tests/fixtures/bitdance/README.md):
  commitment = mean((z - stopgrad(sign(z)))**2) over all elements
  p = softmax(2 <z_group, code> / T) per token and group, over the 2**g codes
  per_sample_entropy = mean over tokens and groups of H(p)                  (minimised)
  codebook_entropy   = H(mean of p over tokens AND groups), log eps 1e-5    (maximised)
  entropy_loss = w_sample * per_sample_entropy - w_codebook * codebook_entropy
The groups share one code distribution for the batch term, as in the release.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdt.tokenizer.config import TokenizerConfig

_LOG_EPS = 1e-5  # inside log(avg_probs + eps) of the batch entropy, as in the release


def sign_bits(z: torch.Tensor) -> torch.Tensor:
    """Hard ±1 in z's dtype: +1 where z > 0, -1 otherwise (exact 0 -> -1)."""
    return torch.where(z > 0, 1.0, -1.0).to(z.dtype)


def code_table(group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """[2**g, g] float32 ±1: row j holds the bits of j, LSB first."""
    j = torch.arange(2 ** group_size, device=device)[:, None]
    k = torch.arange(group_size, device=device)[None, :]
    return ((j >> k) & 1).float() * 2 - 1


def group_indices(positive_NC: torch.Tensor, group_size: int) -> torch.Tensor:
    """Code index per contiguous group of bits: bool/0-1 [N, C] -> int64 [N, C/g], LSB first."""
    n, c = positive_NC.shape
    weights = 2 ** torch.arange(group_size, device=positive_NC.device)
    return (positive_NC.view(n, c // group_size, group_size).long() * weights).sum(-1)


@dataclass
class QuantizerOutput:
    """Everything the training loop needs from one quantizer pass.

    `loss` = commitment_weight * commitment_loss + entropy_loss is the quantizer's total term.
    bit_rates [C]: fraction of tokens where each bit is +1 (a dead bit sits at 0 or 1).
    group_code_entropy [G]: entropy in bits (max g) of each group's hard-code histogram over the
    batch; it falls first when the codes collapse.
    """

    quantized: torch.Tensor  # [B, C, h, w] ±1 forward, identity gradient to z (straight-through)
    z: torch.Tensor  # [B, C, h, w] continuous encoder output
    commitment_loss: torch.Tensor
    entropy_loss: torch.Tensor
    per_sample_entropy: torch.Tensor
    codebook_entropy: torch.Tensor
    loss: torch.Tensor
    bit_rates: torch.Tensor
    group_code_entropy: torch.Tensor


class SignQuantizer(nn.Module):
    """Binarise z_BChw to ±1 with a straight-through estimator and compute the method §1 losses.

    No parameters or buffers: the code table is rebuilt per call (2**g x g, negligible), so a
    model built on the meta device loads real weights with nothing left to materialise.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.group_size = cfg.entropy_group_size
        self.temperature = cfg.entropy_temperature
        self.sample_weight = cfg.sample_entropy_weight
        self.codebook_weight = cfg.codebook_entropy_weight
        self.commitment_weight = cfg.commitment_weight

    def entropy_terms(self, z_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per_sample_entropy, codebook_entropy) of continuous tokens z_NC, in nats, float32."""
        n, c = z_NC.shape
        z_NGg = z_NC.float().view(n, c // self.group_size, self.group_size)
        codes_Kg = code_table(self.group_size, z_NC.device)
        logits_NGK = 2 * z_NGg @ codes_Kg.t() / self.temperature
        log_probs_NGK = F.log_softmax(logits_NGK, dim=-1)
        probs_NGK = log_probs_NGK.exp()
        per_sample = -(probs_NGK * log_probs_NGK).sum(-1).mean()
        avg_probs_K = probs_NGK.mean(dim=(0, 1))
        codebook = -(avg_probs_K * torch.log(avg_probs_K + _LOG_EPS)).sum()
        return per_sample, codebook

    @torch.no_grad()
    def usage_stats(self, positive_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bit_rates [C], group_code_entropy [G] in bits) of hard bits, for collapse monitoring."""
        n, c = positive_NC.shape
        rates_C = positive_NC.float().mean(0)
        codes_NG = group_indices(positive_NC, self.group_size)
        num_groups, num_codes = codes_NG.shape[1], 2 ** self.group_size
        offsets_G = torch.arange(num_groups, device=codes_NG.device) * num_codes
        counts_GK = torch.bincount((codes_NG + offsets_G).flatten(), minlength=num_groups * num_codes)
        p_GK = counts_GK.view(num_groups, num_codes).float() / n
        entropy_G = -(p_GK * torch.log2(p_GK.clamp_min(1e-30))).sum(-1)
        return rates_C, entropy_G

    def forward(self, z_BChw: torch.Tensor) -> QuantizerOutput:
        hard = sign_bits(z_BChw)
        quantized = z_BChw + (hard - z_BChw).detach()
        commitment = F.mse_loss(z_BChw.float(), hard.float())  # hard carries no gradient
        z_NC = z_BChw.permute(0, 2, 3, 1).reshape(-1, z_BChw.shape[1])
        per_sample, codebook = self.entropy_terms(z_NC)
        entropy = self.sample_weight * per_sample - self.codebook_weight * codebook
        rates, group_entropy = self.usage_stats(z_NC > 0)
        return QuantizerOutput(
            quantized=quantized, z=z_BChw, commitment_loss=commitment, entropy_loss=entropy,
            per_sample_entropy=per_sample, codebook_entropy=codebook,
            loss=self.commitment_weight * commitment + entropy,
            bit_rates=rates, group_code_entropy=group_entropy)
