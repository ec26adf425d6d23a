"""Sign quantizer and its losses against the released GFQ fixture (intended formulas)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from bdt.tokenizer import SignQuantizer, TokenizerConfig
from bdt.tokenizer.quantizer import code_table, group_indices

from reference import REF
META = json.loads((REF / "quantizer_tiny.json").read_text())
TENSORS = load_file(REF / "quantizer_tiny.safetensors")


def _quantizer(args: dict) -> SignQuantizer:
    cfg = TokenizerConfig(z_channels=args["dim"], entropy_group_size=args["dim"] // args["num_codebooks"],
                          sample_entropy_weight=args["sample_minimization_weight"],
                          codebook_entropy_weight=args["batch_maximization_weight"])
    return SignQuantizer(cfg.validate())


@pytest.mark.parametrize("case", sorted(META["cases"]))
def test_losses_match_fixture_intended_values(case):
    spec = META["cases"][case]
    expected = spec["results_train_mode"]
    q = _quantizer(spec["constructor_args"])
    x = TENSORS[f"{case}.input"]
    assert (x == 0).sum() == spec["num_exact_zeros_in_input"] > 0
    out = q(x)
    close = dict(rtol=1e-5, atol=1e-6)
    assert math.isclose(out.per_sample_entropy.item(), expected["per_sample_entropy"], rel_tol=1e-5, abs_tol=1e-6)
    assert math.isclose(out.codebook_entropy.item(), expected["codebook_entropy"], rel_tol=1e-5)
    assert math.isclose(out.entropy_loss.item(), expected["entropy_aux_loss"], rel_tol=1e-5)
    # The intended commitment is the mean over all elements, not the released subset of rows.
    assert math.isclose(out.commitment_loss.item(), expected["commitment_full_mean"], rel_tol=1e-5)
    assert not math.isclose(out.commitment_loss.item(), expected["commitment"], rel_tol=1e-4)
    total = q.commitment_weight * expected["commitment_full_mean"] + expected["entropy_aux_loss"]
    torch.testing.assert_close(out.loss, torch.tensor(total), **close)
    # Hard values: exact, including the planted zeros (-> -1).
    assert torch.equal(out.quantized, TENSORS[f"{case}.quantized_hard"])
    assert torch.equal(out.quantized[x == 0], -torch.ones(int((x == 0).sum())))


@pytest.mark.parametrize("case", sorted(META["cases"]))
def test_codes_and_indices_lsb_first(case):
    spec = META["cases"][case]
    g = spec["derived"]["bits_per_group"]
    assert torch.equal(code_table(g), TENSORS[f"{case}.codebook"])
    x = TENSORS[f"{case}.input"]
    positive_NC = (x > 0).permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    idx = group_indices(positive_NC, g)
    for i in range(spec["constructor_args"]["num_codebooks"]):
        assert torch.equal(idx[:, i], TENSORS[f"{case}.indices_group{i}"])


def test_straight_through_gradient_and_commitment_gradient():
    q = SignQuantizer(TokenizerConfig(z_channels=16, entropy_group_size=8))
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    out = q(z)
    (out.quantized * torch.arange(16.0).view(1, 16, 1, 1)).sum().backward()
    # Identity gradient through the sign: each channel gets its own weight back.
    assert torch.equal(z.grad, torch.arange(16.0).view(1, 16, 1, 1).expand_as(z))
    z.grad = None
    q(z).commitment_loss.backward()  # d/dz mean((z - sg(sign z))^2) = 2 (z - sign z) / n
    expected = 2 * (z.detach() - torch.where(z.detach() > 0, 1.0, -1.0)) / z.numel()
    torch.testing.assert_close(z.grad, expected)


def test_entropy_loss_prefers_confident_diverse_codes():
    q = SignQuantizer(TokenizerConfig(z_channels=8, entropy_group_size=8))
    codes = code_table(8)  # all 256 codes once: maximal batch entropy
    diverse = q(codes.view(256, 8, 1, 1) * 5)
    collapsed = q(codes[:1].expand(256, 8).reshape(256, 8, 1, 1) * 5)
    unsure = q(codes.view(256, 8, 1, 1) * 1e-4)
    assert diverse.per_sample_entropy < 1e-3 and diverse.codebook_entropy > math.log(256) - 0.01
    assert collapsed.codebook_entropy < 0.01
    assert unsure.per_sample_entropy > diverse.per_sample_entropy + 1.0
    assert diverse.entropy_loss < collapsed.entropy_loss and diverse.entropy_loss < unsure.entropy_loss


def test_usage_stats_detect_collapse():
    q = SignQuantizer(TokenizerConfig(z_channels=16, entropy_group_size=8))
    codes = code_table(8)
    # Group 0 cycles through all 256 codes; group 1 is stuck on code 5.
    z = torch.cat([codes, code_table(8)[5].expand(256, 8)], dim=1).view(256, 16, 1, 1)
    out = q(z)
    torch.testing.assert_close(out.group_code_entropy, torch.tensor([8.0, 0.0]))
    assert torch.allclose(out.bit_rates[:8], torch.full((8,), 0.5))
    assert out.bit_rates[8:].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # 5 = 0b101, LSB first


def test_losses_in_float32_for_bf16_inputs():
    q = SignQuantizer(TokenizerConfig(z_channels=16, entropy_group_size=8))
    z = torch.randn(4, 16, 2, 2)
    ref, low = q(z.bfloat16().float()), q(z.bfloat16())
    assert low.quantized.dtype == torch.bfloat16 and low.entropy_loss.dtype == torch.float32
    torch.testing.assert_close(low.entropy_loss, ref.entropy_loss)
    torch.testing.assert_close(low.commitment_loss, ref.commitment_loss)
