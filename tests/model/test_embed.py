"""Connector, 2D sin-cos position embedding and bit flipping against the BitDance fixtures."""

import json

import pytest
import torch

from bdt.model.embed import CONNECTOR_KEY_MAP, BitsConnector, PosEmbed2D, flip_bits, sincos_table_1d

import mllm_tiny
from reference import REF, call_value, seed_of

SEQ = json.loads((REF / "sequence_tiny.json").read_text())


@pytest.mark.parametrize("name", sorted(SEQ["pos_embed_2d"]["examples"]))
def test_pos_embed_2d_matches_fixture(name):
    ex = SEQ["pos_embed_2d"]["examples"][name]
    D, (h, w), ps = ex["hidden_size"], ex["grid_hw"], ex["ps"]
    pe = PosEmbed2D(D, max_grid=ex["table_rows (max_len)"])
    first = torch.tensor(ex["pos_embed_1d_first_rows"])
    torch.testing.assert_close(pe.table_GH[: len(first)], first, atol=1e-6, rtol=1e-6)
    want = torch.tensor(ex["embed_2d (sequence order, [h*w, hidden])"])
    torch.testing.assert_close(pe.grid(h, w, ps), want, atol=1e-6, rtol=1e-6)


def test_pos_embed_table_is_not_in_state_dict_and_bounds_checked():
    pe = PosEmbed2D(16, max_grid=4)
    assert list(pe.state_dict()) == []
    with pytest.raises(ValueError, match="exceeds the 2D position table"):
        pe.grid(2, 8, 1)
    with pytest.raises(ValueError, match="hidden % 4"):
        PosEmbed2D(18)
    assert sincos_table_1d(128, 8)[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_bit_flip_worked_example():
    ex = SEQ["bit_flip_perturbation"]["example"]
    seed, p_max = seed_of(ex["call"]), call_value(ex["call"], "p_max")
    x = torch.tensor(ex["x"])
    torch.manual_seed(seed)
    y = flip_bits(x, p_max=p_max)
    assert torch.equal(y, torch.tensor(ex["y"]))
    # The same with an explicit generator: r1 then r2, flip where r1 < p*r2.
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(flip_bits(x, p_max, generator=g), torch.tensor(ex["y"]))
    r1, r2 = torch.tensor(ex["r1"]), torch.tensor(ex["r2"])
    assert torch.equal(y != x, r1 < p_max * r2)
    assert flip_bits(x, 0.0) is x


def test_bit_flip_mean_rate_is_half_p():
    x = torch.ones(200_000)
    rate = (flip_bits(x, 0.1, torch.Generator().manual_seed(0)) < 0).float().mean().item()
    assert abs(rate - 0.05) < 0.002


def test_mllm_tiny_image_inputs():
    """Flip (the forward's seed: its first draws), connector and pos-embed reproduce the
    reference's LLM inputs at the image positions."""
    tiny, cfg = mllm_tiny.TENSORS, mllm_tiny.model_config()
    hidden = mllm_tiny.QWEN3["hidden_size"]
    bits = tiny["mid.vision_latents"]
    torch.manual_seed(mllm_tiny.FORWARD_SEED)
    flipped = flip_bits(bits, cfg.flip_prob)
    assert torch.equal(flipped, tiny["mid.vision_latents_flipped"])

    pe = PosEmbed2D(hidden, max_grid=cfg.pos_max_len)
    pos = torch.cat([pe.grid(h, w, cfg.patch_size) for h, w in mllm_tiny.LAYOUT["gen_vit_latent_shapes"]])
    torch.testing.assert_close(pos, tiny["mid.pos_embed_image_tokens"], atol=1e-6, rtol=1e-6)

    conn = BitsConnector(bits.shape[1], hidden)
    conn.load_state_dict({ours: tiny[f"param.{theirs}"].float() for theirs, ours in CONNECTOR_KEY_MAP.items()})
    embeds = conn(flipped) + pos
    img_pos = tiny["in.packed_vit_token_indexes"]
    torch.testing.assert_close(embeds, tiny["mid.llm_inputs_embeds"][img_pos], atol=1e-6, rtol=1e-6)
