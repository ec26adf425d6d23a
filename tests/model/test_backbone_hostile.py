"""Damaged or hostile LLM folders: a clear error naming the file/field/tensor before training,
no remote code run, nothing unpickled."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bdt.model.backbone import load_backbone, make_tiny_llm
from bdt.model.backbone_config import BackboneConfig

CAPTIONS = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return make_tiny_llm(str(tmp_path_factory.mktemp("llm") / "qwen3"), CAPTIONS, hidden=32,
                         heads=4, kv_heads=2, intermediate=64)


def _copy(llm_dir, tmp_path):
    folder = str(tmp_path / "llm")
    shutil.copytree(llm_dir, folder)
    return folder


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))


def _edit_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


@pytest.mark.parametrize("changes, named", [
    ({"hidden_size": "abc"}, "hidden_size"),
    ({"num_hidden_layers": -1}, "num_hidden_layers"),
    ({"head_dim": None}, "head_dim"),
])
def test_bad_config_values_name_config_json_and_field(llm_dir, tmp_path, changes, named):
    folder = _copy(llm_dir, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=rf"config\.json.*invalid(.|\n)*{named}"):
        load_backbone(BackboneConfig(path=folder), parallel_num=4)



@pytest.mark.parametrize("changes, named", [
    ({"num_attention_heads": 0}, r"num_attention_heads=0; sizes must be >= 1"),
    ({"hidden_size": -1}, r"hidden_size=-1; sizes must be >= 1"),
    ({"hidden_act": "nope"}, r"KeyError: 'nope'"),
])
def test_config_values_the_model_cannot_be_built_with_are_one_error(llm_dir, tmp_path, changes,
                                                                     named):
    """Values of the right type that transformers lets through: a ZeroDivisionError, RuntimeError
    or KeyError traceback from inside the model's constructor."""
    folder = _copy(llm_dir, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ValueError, match=rf"backbone .*config.*{named}"):
        load_backbone(BackboneConfig(path=folder), parallel_num=4)


def test_config_overrides_the_model_cannot_be_built_with_are_named(llm_dir):
    """An override of the right type that the model's constructor fails on: a KeyError
    traceback from inside it."""
    cfg = BackboneConfig(path=llm_dir, config_overrides={"hidden_act": "nope"})
    with pytest.raises(ValueError, match=r"config_overrides \{'hidden_act': 'nope'\}\): "
                                         r"KeyError"):
        load_backbone(cfg, parallel_num=4)


@pytest.mark.parametrize("config_class, extra, named", [
    ("Lfm2Config", {"layer_types": ["conv", "full_attention"]}, r"\['conv'\]"),
    ("JambaConfig", {"attn_layer_period": 2, "attn_layer_offset": 1, "num_experts": 1},
     r"\['linear_attention'\]"),
])
def test_layers_other_than_attention_are_refused(llm_dir, tmp_path, config_class, extra, named):
    """A convolution or state-space layer carries state from one packed sample into the next
    (and sees no patch whole): such backbones trained on leaking rows, without an error."""
    import transformers

    folder = _copy(llm_dir, tmp_path)
    getattr(transformers, config_class)(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **extra).save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"config\.json'?: {config_class} has {named} layers "
                                         rf"\(\[0\]\): .*attention layers only"):
        load_backbone(BackboneConfig(path=folder, from_scratch=True), parallel_num=4)


@pytest.mark.parametrize("config_class, fields", [
    ("RwkvConfig", {"attention_hidden_size": 32}),
    ("xLSTMConfig", {"embedding_dim": 32, "num_heads": 4}),
])
def test_recurrent_lms_without_attention_are_refused(llm_dir, tmp_path, config_class, fields):
    """transformers reads a config without layer kinds as all attention: RWKV and xLSTM passed
    the check above and failed in BitDanceModel with an AttributeError traceback."""
    import transformers

    folder = _copy(llm_dir, tmp_path)
    getattr(transformers, config_class)(vocab_size=512, hidden_size=32, num_hidden_layers=2,
                                        **fields).save_pretrained(folder)
    with pytest.raises(ValueError, match=rf"config\.json'?: {config_class} names no "
                                         rf"num_attention_heads: .* all attention"):
        load_backbone(BackboneConfig(path=folder, from_scratch=True), parallel_num=4)


def test_a_multimodal_checkpoint_is_refused_naming_its_text_config(llm_dir, tmp_path):
    """A Gemma 3 image-text checkpoint keeps its language model's sizes under text_config: it
    was refused as if it had no attention at all ("RWKV and xLSTM are recurrent")."""
    import transformers

    folder = _copy(llm_dir, tmp_path)
    text = {"vocab_size": 512, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 4, "image_size": 28, "patch_size": 14}
    transformers.Gemma3Config(text_config=text, vision_config=vision).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"Gemma3Config is a multimodal model \(its language "
                                         r"model is under text_config\)"):
        load_backbone(BackboneConfig(path=folder, from_scratch=True), parallel_num=4)


@pytest.mark.parametrize("config_json, overrides, named", [
    ({"sliding_window": 0}, {}, r"config\.json'?: sliding_window=0 of its sliding_attention"),
    ({"sliding_window": 3}, {"sliding_window": 2**63}, r"config\.json'? \(overridden by "
     r"model\.backbone\.config_overrides .*\): sliding_window=9223372036854775808 of its "
     r"sliding_attention layers: .*< 2\^31"),
])
def test_a_bad_window_is_named_before_the_weights(llm_dir, tmp_path, config_json, overrides,
                                                   named):
    """A window below 1 was refused after the weights were read, naming no file; one past
    int64 (2^63) masked every key of a sliding layer without a word."""
    from transformers import MistralConfig

    folder = _copy(llm_dir, tmp_path)
    MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  **config_json).save_pretrained(folder)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"not weights: never read")
    with pytest.raises(ValueError, match=named):
        load_backbone(BackboneConfig(path=folder, config_overrides=overrides), parallel_num=4)


def test_layer_kinds_without_token_mixing_pass_and_a_config_transformers_cannot_read_too():
    """MLP- and MoE-only layers mix no tokens: refusing them refused benign backbones. Where
    transformers' (internal) reading of the layer kinds fails, the config's layer_types decide
    (it raised an AttributeError)."""
    from types import SimpleNamespace

    from bdt.model.backbone_config import _refuse_stateful_layers

    _refuse_stateful_layers(SimpleNamespace(layer_types=["full_attention", "moe", "mlp"]), "c")
    with pytest.raises(ValueError, match=r"has \['mamba'\] layers \(\[1\]\)"):
        _refuse_stateful_layers(SimpleNamespace(layer_types=["full_attention", "mamba"]), "c")


def test_tokenizer_larger_than_the_embedding_is_refused(llm_dir, tmp_path):
    folder = _copy(llm_dir, tmp_path)
    rows = 100  # weights and config agree with each other, not with the tokenizer
    _edit_config(folder, vocab_size=rows)
    _edit_weights(folder, lambda s: s.update({k: s[k][:rows].clone() for k in
                                              ("model.embed_tokens.weight", "lm_head.weight")}))
    with pytest.raises(ValueError, match=r"tokenizer has \d+ tokens but config.json vocab_size is 100"):
        load_backbone(BackboneConfig(path=folder), parallel_num=4)


def test_missing_tokenizer_files_are_refused(llm_dir, tmp_path):
    folder = _copy(llm_dir, tmp_path)
    for name in os.listdir(folder):
        if name.startswith(("tokenizer", "special_tokens")):
            os.remove(os.path.join(folder, name))
    with pytest.raises(OSError, match="encodes text to no tokens"):
        load_backbone(BackboneConfig(path=folder), parallel_num=4)


def test_a_tokenizer_config_of_the_wrong_shape_is_named(llm_dir, tmp_path):
    """A tokenizer_config.json holding JSON that is no object (an edit, a bad copy) ended
    `bdt sample` and training with an AttributeError traceback."""
    folder = _copy(llm_dir, tmp_path)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, "w") as f:
        f.write("[1]")
    with pytest.raises(OSError, match=f"{path} holds no JSON object"):
        load_backbone(BackboneConfig(path=folder), parallel_num=4)


@pytest.mark.parametrize("content", ["{}", '{"added_tokens": [], "model": 1}', "[]"])
def test_a_tokenizer_json_of_the_wrong_shape_is_one_line_naming_the_folder(llm_dir, tmp_path,
                                                                          content):
    """A tokenizer.json that is JSON but no tokenizer (an edit, another tool's file) ended
    `bdt sample` and training with a KeyError, TypeError or tokenizers' own Exception traceback."""
    folder = _copy(llm_dir, tmp_path)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(content)
    with pytest.raises(OSError, match=f"cannot load a text tokenizer from '{folder}': ") as e:
        load_backbone(BackboneConfig(path=folder), parallel_num=4)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_named(llm_dir, tmp_path, value):
    folder = _copy(llm_dir, tmp_path)
    _edit_weights(folder, lambda s: s["model.layers.1.mlp.up_proj.weight"].view(-1).__setitem__(3, value))
    with pytest.raises(ValueError, match=r"NaN or inf.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_backbone(BackboneConfig(path=folder), parallel_num=4)


def test_auto_map_code_is_never_run(llm_dir, tmp_path):
    folder = _copy(llm_dir, tmp_path)
    marker = tmp_path / "ran"
    with open(os.path.join(folder, "custom.py"), "w") as f:
        f.write(f"open({str(marker)!r}, 'w').close()\n")
    config = json.load(open(os.path.join(folder, "config.json")))
    del config["model_type"]  # only the remote class could build it
    config["auto_map"] = {"AutoConfig": "custom.C", "AutoModelForCausalLM": "custom.M"}
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    with pytest.raises(ValueError, match="custom code"):
        load_backbone(BackboneConfig(path=folder), parallel_num=4)
    assert not marker.exists()


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_bin_weights_are_not_unpickled(llm_dir, tmp_path):
    folder = _copy(llm_dir, tmp_path)
    marker = str(tmp_path / "ran")
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save({"model.norm.weight": _RunsCode(marker)}, os.path.join(folder, "pytorch_model.bin"))
    with pytest.raises(ValueError, match="Weights only load failed"):
        load_backbone(BackboneConfig(path=folder), parallel_num=4)
    assert not os.path.exists(marker)
