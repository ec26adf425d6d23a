"""BitDance-14B checkpoint compatibility, checked on the meta device (issue 4 part 8).

The model is built from the fixture's own record of the release's configuration
(mllm_keys_14b.json: the MLLModel config, the Qwen3 config and the resized vocabulary of each
variant), so another fixture of this format runs through the same tests."""

import copy
import json

import pytest
import torch

from bdt.model.head import head_config_from_bitdance
from bdt.model.keymap import (
    bitdance_key_map,
    compare_with_reference,
    key_from_bitdance,
    meta_model_from_bitdance,
    model_config_from_bitdance,
    split_bitdance_state_dict,
    state_dict_to_bitdance,
)

from reference import REF as REF_DIR

REF = json.loads((REF_DIR / "mllm_keys_14b.json").read_text())
# The variants are named by P ("16x", "64x"), each with the vocabulary it was resized to.
VARIANTS = sorted(REF["resize_token_embeddings_called_with"], key=lambda v: int(v.rstrip("x")))
BASE = next(v for v in VARIANTS if f"state_dict_{v}" in REF)


def meta_model(variant: str):
    """Our model under the release's config of this variant, on the meta device."""
    config = copy.deepcopy(REF[f"model_config_{BASE}"])
    config["head"]["vision_pred"]["parallel_num"] = int(variant.rstrip("x"))
    (vocab,) = REF["resize_token_embeddings_called_with"][variant]
    return meta_model_from_bitdance(config, {**REF["qwen3_14b_config_used"], "vocab_size": vocab})


def reference_shapes(variant: str) -> dict[str, list[int]]:
    """The fixture lists the other variants as shape differences from the base one."""
    reference = dict(REF[f"state_dict_{BASE}"])
    if variant != BASE:
        reference.update({k: v[variant] for k, v in REF[f"shape_differences_{BASE}_vs_{variant}"].items()})
    return reference


def test_configs_read_from_the_release_agree():
    """The MLLModel config and the DiffHead arguments the fixture records give one head."""
    hidden = REF["qwen3_14b_config_used"]["hidden_size"]
    cfg = model_config_from_bitdance(REF[f"model_config_{BASE}"], hidden)
    from_args = head_config_from_bitdance(REF[f"head_constructor_args_{BASE}"])
    assert cfg.head == from_args
    assert cfg.parallel_num == from_args.tokens and cfg.head.cond_dim == hidden


@pytest.mark.parametrize("variant", VARIANTS)
def test_14b_keys_map_one_to_one_with_equal_shapes(variant):
    model = meta_model(variant)
    reference = reference_shapes(variant)
    assert len(reference) == REF["num_keys"]
    assert compare_with_reference(model, reference) == []
    ar_keys = [k for k in reference if not k.startswith("vision_encoder.")]
    assert len(model.state_dict()) == len(ar_keys)
    n_params = sum(p.numel() for p in model.parameters())
    by_component = REF[f"num_params_by_component_{variant}"]
    expected = sum(v for k, v in by_component.items() if k != "vision_encoder")
    assert n_params == expected
    # The export direction is the exact inverse.
    mapping = bitdance_key_map(model)
    assert sorted(mapping) == sorted(ar_keys)
    assert sorted(mapping.values()) == sorted(model.state_dict())
    assert all(key_from_bitdance(k) == v for k, v in mapping.items())


def test_key_map_problems_are_reported():
    model = meta_model(BASE)
    reference = reference_shapes(BASE)
    lm_head = list(reference["llm_model.lm_head.weight"])
    reference["llm_model.lm_head.weight"] = [lm_head[0] - 4, lm_head[1]]  # an unresized vocab
    del reference["vision_diffusion_head.net.final_layer.linear.bias"]
    reference["projector.fc1.weight"] = [1, 1]
    problems = compare_with_reference(model, reference)
    assert any("lm_head.weight" in p and str(lm_head[0] - 4) in p for p in problems)
    assert any("head.final_proj.bias has no BitDance counterpart" in p for p in problems)
    assert any("projector.fc1.weight" in p and "no known component" in p for p in problems)


def test_a_head_of_the_other_mlp_kind_is_named():
    """A checkpoint whose head has the other MLP kind: the keys say which, not a shape error."""
    model = meta_model(BASE)
    kind = model.head.cfg.mlp
    theirs, other = {"swiglu": ("w1", "mlp.0"), "plain": ("mlp.0", "w1")}[kind]
    reference = {(k.replace(f".{theirs}.", f".{other}.") if ".res_blocks." in k else k): v
                 for k, v in reference_shapes(BASE).items()}
    problems = compare_with_reference(model, reference)
    assert any(f"model.head.mlp is '{kind}'" in p for p in problems)


def test_tokenizer_keys_are_split_off_and_export_roundtrips():
    model = meta_model(BASE)
    exported = state_dict_to_bitdance(model)
    exported["vision_encoder.encoder.conv_in.weight"] = torch.empty(2, device="meta")
    ours, tokenizer = split_bitdance_state_dict(exported)
    assert list(tokenizer) == ["encoder.conv_in.weight"]
    assert sorted(ours) == sorted(model.state_dict())
    assert key_from_bitdance("vision_encoder.decoder.conv_out.bias") is None
    with pytest.raises(ValueError, match="unknown BitDance diffusion-head key"):
        key_from_bitdance("vision_diffusion_head.net.res_blocks.0.attn.bogus.weight")


def test_unsupported_head_type_is_refused():
    config = copy.deepcopy(REF[f"model_config_{BASE}"])
    config["head"]["vision_pred"]["type"] = "standard"
    with pytest.raises(ValueError, match="vision_pred.type 'standard' is not supported"):
        model_config_from_bitdance(config, 64)
