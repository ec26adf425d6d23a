"""BitDance-14B checkpoint compatibility, checked on the meta device (issue 4 part 8)."""

import json

import pytest
import torch

from bdt.model.keymap import (
    bitdance_key_map,
    compare_with_reference,
    key_from_bitdance,
    meta_model_14b,
    split_bitdance_state_dict,
    state_dict_to_bitdance,
)

from reference import REF as REF_DIR

REF = json.loads((REF_DIR / "mllm_keys_14b.json").read_text())


@pytest.mark.parametrize("parallel_num", [16, 64])
def test_14b_keys_map_one_to_one_with_equal_shapes(parallel_num):
    model = meta_model_14b(parallel_num)
    reference = dict(REF["state_dict_16x"])
    if parallel_num == 64:  # the fixture lists the 64x model as shape differences from 16x
        reference.update({k: v["64x"] for k, v in REF["shape_differences_16x_vs_64x"].items()})
    assert len(reference) == REF["num_keys"]
    assert compare_with_reference(model, reference) == []
    ar_keys = [k for k in reference if not k.startswith("vision_encoder.")]
    assert len(model.state_dict()) == len(ar_keys)
    n_params = sum(p.numel() for p in model.parameters())
    by_component = REF[f"num_params_by_component_{parallel_num}x"]
    expected = sum(v for k, v in by_component.items() if k != "vision_encoder")
    assert n_params == expected
    # The export direction is the exact inverse.
    mapping = bitdance_key_map(model)
    assert sorted(mapping) == sorted(ar_keys)
    assert sorted(mapping.values()) == sorted(model.state_dict())
    assert all(key_from_bitdance(k) == v for k, v in mapping.items())


def test_key_map_problems_are_reported():
    model = meta_model_14b(16)
    reference = dict(REF["state_dict_16x"])
    reference["llm_model.lm_head.weight"] = [151936, 5120]  # an unresized vocab
    del reference["vision_diffusion_head.net.final_layer.linear.bias"]
    reference["projector.fc1.weight"] = [1, 1]
    problems = compare_with_reference(model, reference)
    assert any("lm_head.weight" in p and "151936" in p for p in problems)
    assert any("head.final_proj.bias has no BitDance counterpart" in p for p in problems)
    assert any("projector.fc1.weight" in p and "no known component" in p for p in problems)


def test_tokenizer_keys_are_split_off_and_export_roundtrips():
    model = meta_model_14b(16)
    exported = state_dict_to_bitdance(model)
    exported["vision_encoder.encoder.conv_in.weight"] = torch.empty(2, device="meta")
    ours, tokenizer = split_bitdance_state_dict(exported)
    assert list(tokenizer) == ["encoder.conv_in.weight"]
    assert sorted(ours) == sorted(model.state_dict())
    assert key_from_bitdance("vision_encoder.decoder.conv_out.bias") is None
    with pytest.raises(ValueError, match="unknown BitDance diffusion-head key"):
        key_from_bitdance("vision_diffusion_head.net.res_blocks.0.attn.bogus.weight")
