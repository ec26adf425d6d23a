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
