"""A backbone's layer types, from its config.json and model.backbone.config_overrides: one per
layer, else one line naming the file, layer_types and both lengths; overrides apply as if the
file said so (fields derived from them follow)."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest

from bdt.model.backbone import load_causal_lm, make_tiny_llm
from bdt.model.backbone_config import BackboneConfig, check_llm_config, llm_config

CAPTIONS = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
FULL, SLIDING = "full_attention", "sliding_attention"


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny Qwen3 of 2 layers, saved as save_pretrained writes it: layer_types listed."""
    return make_tiny_llm(str(tmp_path_factory.mktemp("llm") / "qwen3"), CAPTIONS, hidden=32,
                         heads=4, kv_heads=2, intermediate=64)


def _with_config(llm_dir, tmp_path, **changes) -> str:
    """A copy of the LLM whose config.json has `changes` (a None value: the field removed)."""
    folder = str(tmp_path / "llm")
    shutil.copytree(llm_dir, folder)
    path = os.path.join(folder, "config.json")
    config = {**json.load(open(path)), **changes}
    json.dump({k: v for k, v in config.items() if v is not None}, open(path, "w"))
    return folder


@pytest.mark.parametrize("types", [[FULL] * 3, [FULL]])
def test_layer_types_of_another_length_in_config_json_are_one_line(llm_dir, tmp_path, types):
    folder = _with_config(llm_dir, tmp_path, layer_types=types)
    with pytest.raises(ValueError, match=rf"^backbone config '.*llm/config\.json' is invalid: "
                                         rf".*`num_hidden_layers` \(2\) .* `layer_types` "
                                         rf"\({len(types)}\)$"):
        llm_config(BackboneConfig(path=folder))


@pytest.mark.parametrize("overrides, lengths", [
    ({"layer_types": [FULL] * 3}, (2, 3)),
    ({"layer_types": [FULL]}, (2, 1)),
    ({"num_hidden_layers": 3, "layer_types": [FULL] * 2}, (3, 2)),
])
def test_overrides_giving_layer_types_of_another_length_are_refused(llm_dir, overrides,
                                                                     lengths):
    """transformers sets overrides after validating the config: these were accepted (a list
    longer than the layers, or shorter: an IndexError once the model was built)."""
    layers, types = lengths
    with pytest.raises(ValueError, match=rf"^backbone config '.*qwen3/config\.json' \(overridden "
                                         rf"by model\.backbone\.config_overrides .*\) is invalid: "
                                         rf".*\({layers}\) .* `layer_types` \({types}\)$"):
        llm_config(BackboneConfig(path=llm_dir, config_overrides=overrides))


def test_a_config_built_elsewhere_with_layer_types_of_another_length_is_refused():
    """A config not validated at construction (a release's, read by its importer)."""
    config = SimpleNamespace(num_hidden_layers=2, layer_types=[FULL] * 3, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"^backbone config 'x/config\.json': layer_types lists "
                                         r"3 layer types but num_hidden_layers is 2"):
        check_llm_config(config, "x/config.json")


def test_overriding_num_hidden_layers_derives_the_layer_types_again(llm_dir, tmp_path):
    """The saved list is the one the config derives: 4 layers get 4 layer types (the GPU
    configs' overrides of the demo LLM ended in an IndexError); a list of its own is kept, and
    an override of the layer count past it refused."""
    model = load_causal_lm(BackboneConfig(path=llm_dir, from_scratch=True,
                                          config_overrides={"num_hidden_layers": 4}))
    assert model.config.layer_types == [FULL] * 4 and len(model.model.layers) == 4
    folder = _with_config(llm_dir, tmp_path, use_sliding_window=True, sliding_window=4,
                          layer_types=[SLIDING, FULL])
    with pytest.raises(ValueError, match=r"\(overridden by .*'num_hidden_layers': 4.*\(4\) .* "
                                         r"`layer_types` \(2\)$"):
        llm_config(BackboneConfig(path=folder, config_overrides={"num_hidden_layers": 4}))


@pytest.mark.parametrize("file, overrides, types, window", [
    # Qwen's rule: with use_sliding_window, layers from max_window_layers on slide.
    ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}, {},
     [FULL, SLIDING], 4),
    ({"use_sliding_window": False, "sliding_window": 4, "max_window_layers": 0}, {},
     [FULL, FULL], None),
    ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0},
     {"use_sliding_window": False}, [FULL, FULL], None),
    ({}, {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1},
     [FULL, SLIDING], 3),
])
def test_window_fields_and_their_overrides_are_honoured(llm_dir, tmp_path, file, overrides,
                                                        types, window):
    """use_sliding_window=false overriding a sliding config kept every sliding layer (and
    use_sliding_window=true no layer slid): the override was set after the layer types were
    derived from the file."""
    from transformers import AutoConfig

    folder = _with_config(llm_dir, tmp_path, layer_types=None, **file)
    # as save_pretrained writes such a config: the layer types it derives listed
    AutoConfig.from_pretrained(folder).save_pretrained(folder)
    assert "layer_types" in json.load(open(os.path.join(folder, "config.json")))
    config = llm_config(BackboneConfig(path=folder, config_overrides=overrides))
    assert config.layer_types == types and config.sliding_window == window


MODERN = {"rope_parameters": {"rope_type": "default", "rope_theta": 12345.0}}
LEGACY = {"rope_parameters": None, "rope_theta": 12345.0, "rope_scaling": None}  # transformers 4


@pytest.mark.parametrize("file", [MODERN, LEGACY], ids=["rope_parameters", "legacy"])
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_overriding_the_rope_type_alone_keeps_the_files_rope_theta(llm_dir, tmp_path, file, key):
    """transformers 5 keeps rope_theta inside rope_parameters: an override of the type alone
    gave the class default (10000), not the file's theta, and no error."""
    folder = _with_config(llm_dir, tmp_path, **file)
    config = llm_config(BackboneConfig(path=folder, config_overrides={
        key: {"rope_type": "linear", "factor": 2.0}}))
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 12345.0}
    given = llm_config(BackboneConfig(path=folder, config_overrides={
        key: {"rope_type": "linear", "factor": 2.0, "rope_theta": 50.0}}))
    assert given.rope_parameters["rope_theta"] == 50.0


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
     "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("where", ["file", "override"])
def test_a_rope_type_following_the_sequence_length_is_refused(llm_dir, tmp_path, rope, where):
    """dynamic NTK and longrope recompute their frequencies from the batch's longest position:
    cached sampling would rotate its keys otherwise than training did. Refused at load, naming
    the key and the type; static types load."""
    file = {"rope_parameters": {**rope, "rope_theta": 1e4}} if where == "file" else {}
    folder = _with_config(llm_dir, tmp_path, **file)
    overrides = {"rope_scaling": rope} if where == "override" else {}
    with pytest.raises(ValueError, match=rf"config\.json.*: rope_parameters\.rope_type="
                                         rf"'{rope['rope_type']}' changes the RoPE frequencies"):
        llm_config(BackboneConfig(path=folder, config_overrides=overrides))
    for static in ({"rope_type": "linear", "factor": 2.0},
                   {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}):
        llm_config(BackboneConfig(path=folder, config_overrides={"rope_parameters": static}))


def test_a_length_dependent_rope_of_one_layer_type_is_named_by_it():
    config = SimpleNamespace(rope_parameters={"full_attention": {"rope_type": "default"},
                                              "sliding_attention": {"rope_type": "dynamic"}})
    with pytest.raises(ValueError, match=r"'c\.json': rope_parameters\.sliding_attention\."
                                         r"rope_type='dynamic'"):
        check_llm_config(config, "c.json")
