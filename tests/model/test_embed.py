"""Connector, 2D sin-cos position embedding and bit flipping against the BitDance fixtures."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bdt.model.embed import CONNECTOR_KEY_MAP, BitsConnector, PosEmbed2D, flip_bits, sincos_table_1d

from reference import REF
SEQ = json.loads((REF / "sequence_tiny.json").read_text())
MLLM = json.loads((REF / "mllm_tiny.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    return load_file(str(REF / "mllm_tiny.safetensors"))


@pytest.mark.parametrize("name", ["hidden16_4x4_ps1", "hidden16_4x4_ps2", "hidden16_2x4_ps1"])
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
    x = torch.tensor(ex["x"])
    torch.manual_seed(6)
    y = flip_bits(x, p_max=0.5)
    assert torch.equal(y, torch.tensor(ex["y"]))
    # The same with an explicit generator: r1 then r2, flip where r1 < p*r2.
    g = torch.Generator().manual_seed(6)
    assert torch.equal(flip_bits(x, 0.5, generator=g), torch.tensor(ex["y"]))
    r1, r2 = torch.tensor(ex["r1"]), torch.tensor(ex["r2"])
    assert torch.equal(y != x, r1 < 0.5 * r2)
    assert flip_bits(x, 0.0) is x


def test_bit_flip_mean_rate_is_half_p():
    x = torch.ones(200_000)
    rate = (flip_bits(x, 0.1, torch.Generator().manual_seed(0)) < 0).float().mean().item()
    assert abs(rate - 0.05) < 0.002


def test_mllm_tiny_image_inputs(tiny):
    """Flip (seed 104, the first draws of the forward), connector and pos-embed reproduce the
    reference's LLM inputs at the image positions."""
    hidden = MLLM["tiny_qwen3_config (after resize; vocab_size = resized rows)"]["hidden_size"]
    bits = tiny["mid.vision_latents"]
    torch.manual_seed(104)
    flipped = flip_bits(bits, MLLM["model_config (OmegaConf passed as MLLModel(config))"]["head"]["vision_perturb"])
    assert torch.equal(flipped, tiny["mid.vision_latents_flipped"])

    pe = PosEmbed2D(hidden, max_grid=2048 // 4)
    pos = torch.cat([pe.grid(8, 8, 2), pe.grid(4, 8, 2)])
    torch.testing.assert_close(pos, tiny["mid.pos_embed_image_tokens"], atol=1e-6, rtol=1e-6)

    conn = BitsConnector(bits.shape[1], hidden)
    conn.load_state_dict({ours: tiny[f"param.{theirs}"].float() for theirs, ours in CONNECTOR_KEY_MAP.items()})
    embeds = conn(flipped) + pos
    img_pos = tiny["in.packed_vit_token_indexes"]
    torch.testing.assert_close(embeds, tiny["mid.llm_inputs_embeds"][img_pos], atol=1e-6, rtol=1e-6)
