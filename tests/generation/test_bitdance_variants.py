"""Released BitDance folders of other configurations (tests/generation/bitdance_variants.py: P = 1,
16, 64, heads of other depths and adaLN sets, the 32x generative-decoder tokenizer, tied
embeddings, GQA and head_dim of other Qwen3 sizes, bf16 / fp16 weights, shards, the diffusers
port) import, load with every architecture parameter taken from their files, and reproduce the
modules they were saved from; damaged ones fail naming the file and the key."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bdt.generation.bitdance_release import import_release
from bdt.generation.sampling import SamplingConfig
from bdt.generation.load import load_trained
from bdt.model.keymap import AE_WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS, PROJECTOR_WEIGHTS

from bitdance_variants import VARIANTS, WORDS, folder, write_variant


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def imported(request, tmp_path_factory):
    v = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(v.name)
    saved = write_variant(v, root / "src")
    import_release(str(folder(v, root / "src")), str(root / "export"))
    return v, saved, load_trained(str(root / "export"))


def _close(ours, theirs, msg):
    # Same weights and dtype; a bf16 / fp16 LLM's attention kernel may differ in its rounding.
    tol = 0.0 if ours.dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol, msg=msg)


def test_the_loaded_model_is_the_saved_one(imported):
    v, saved, trained = imported
    model, g = trained.model, torch.Generator().manual_seed(1)
    cfg, head = model.cfg, model.head.cfg
    assert (cfg.parallel_num, head.width, head.depth, head.num_adaln_sets, head.bits) == (
        v.P, v.head_width, v.head_depth, v.adaln_sets, v.tokenizer["z_channels"])
    assert head.mlp == ("swiglu" if v.swiglu else "plain")
    assert cfg.backbone.dtype == v.dtype_name
    assert model.llm.get_input_embeddings().weight.dtype == v.dtype
    # The release's res tokens and position table: 4096 px per side, whatever the downsampling;
    # none added, so the vocabulary is the release's.
    assert len(model.special.res_ids) == cfg.pos_max_len == 4096 // v.downsample
    llm_cfg = model.llm.config
    assert model.special.vocab_size == llm_cfg.vocab_size == saved.llm.config.vocab_size
    assert (llm_cfg.num_key_value_heads, llm_cfg.head_dim, llm_cfg.tie_word_embeddings) == (
        v.kv_heads, v.head_dim, v.tied)
    if v.tied:
        assert model.llm.lm_head.weight is model.llm.get_input_embeddings().weight
    assert trained.decoder.downsample_factor == v.downsample
    assert trained.decoder.config.gan_decoder == v.tokenizer["gan"]

    saved_llm = saved.llm.state_dict()
    for key, value in model.llm.state_dict().items():
        assert torch.equal(value, saved_llm[key]), key
    ids = torch.randint(0, WORDS, (2, 9), generator=g)
    with torch.no_grad():
        _close(model.llm(ids).logits, saved.llm(ids).logits, "LLM logits")
        bits = torch.randn(3, v.P, head.bits, generator=g).sign()
        _close(model.connector(bits), saved.connector(bits), "connector")
        x_t, t = torch.randn(3, v.P, head.bits, generator=g), torch.rand(3, generator=g)
        cond = torch.randn(3, v.P, v.hidden, generator=g)
        _close(model.head(x_t, t, cond), saved.head(x_t, t, cond), "head")
        grid = torch.rand(1, 2, 2, head.bits, generator=g) > 0.5
        noise = torch.randn(grid.shape, generator=g)
        _close(trained.decoder.decode(grid, noise), saved.autoencoder.decode(grid, noise),
               "decoder")


def test_the_loaded_model_samples(imported):
    v, _, trained = imported
    side = trained.unit  # one patch: the smallest bucket (P = 64 at 16x: 128 px)
    images = trained.images(["w1 w2"], side, side, SamplingConfig(num_steps=2, cfg_scale=2.0),
                            progress=False)
    assert images[0].size == (side, side)


# --- damaged variants ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("p16_bf16") / "src"
    write_variant(VARIANTS["p16_bf16"], root)
    return root


def _edit(path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _nan(key):
    def change(tensors):
        tensors[key] = tensors[key] * float("nan")
    return change


def _wrong_shape(key):
    def change(tensors):
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
    return change


def _extra(key):
    def change(tensors):
        tensors[key] = torch.zeros(2, dtype=torch.bfloat16)
    return change


def _missing(key):
    return lambda tensors: tensors.pop(key)


@pytest.mark.parametrize("name, change, problem, key", [
    (AE_WEIGHTS, _missing("decoder.conv_out.bias"), "missing key", "decoder.conv_out.bias"),
    (AE_WEIGHTS, _nan("encoder.conv_out.weight"), "NaN", "encoder.conv_out.weight"),
    (AE_WEIGHTS, _extra("decoder.extra.weight"), "unexpected key", "decoder.extra.weight"),
    (HEAD_WEIGHTS, _wrong_shape("net.final_layer.linear.weight"), "shape mismatch",
     "net.final_layer.linear.weight"),
    (HEAD_WEIGHTS, _extra("net.ada_ln_blocks.3.weight"), "unexpected key",
     "net.ada_ln_blocks.3.weight"),  # one adaLN set more than the config's 3
    (HEAD_WEIGHTS, _missing("net.res_blocks.2.w2.bias"), "missing key", "net.res_blocks.2.w2.bias"),
    (PROJECTOR_WEIGHTS, _nan("fc2.bias"), "NaN", "fc2.bias"),
    (PROJECTOR_WEIGHTS, _wrong_shape("fc1.weight"), "shape mismatch", "fc1.weight"),
])
def test_a_damaged_component_is_named_with_its_key(release, tmp_path, name, change, problem, key):
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    _edit(bad / name, change)
    out = tmp_path / "export"
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad / name))}.*{problem}.*"
                                         rf"\[{re.escape(key)}[\]:]"):
        import_release(str(bad), str(out))
    assert not out.exists()


def test_a_damaged_shard_is_named_with_its_key(tmp_path):
    v = VARIANTS["p1_fp16_sharded"]
    src = tmp_path / "src"
    write_variant(v, src)
    index = src / (HEAD_WEIGHTS + ".index.json")
    shard = json.loads(index.read_text())["weight_map"]["net.input_proj.bias"]
    _edit(src / shard, _nan("net.input_proj.bias"))
    with pytest.raises(ValueError, match=rf"{re.escape(str(src / HEAD_WEIGHTS))}.*NaN.*"
                                         r"\[net\.input_proj\.bias\]"):
        import_release(str(src), str(tmp_path / "export"))


def test_an_unused_shard_index_beside_a_component_stays_out_of_the_export(release, tmp_path):
    """ae.safetensors wins over ae.safetensors.index.json beside it: neither the index nor its
    shards are the LLM's files, so the export's llm/ holds exactly the LLM's."""
    from mllm_tiny import save_weights

    src = tmp_path / "src"
    shutil.copytree(release, src)
    llm_files = {p.name for p in src.iterdir()} - {
        "ae.safetensors", "ae_config.json", HEAD_WEIGHTS, "vision_head_config.json",
        PROJECTOR_WEIGHTS}
    tensors = load_file(src / AE_WEIGHTS)
    (tmp_path / "sharded").mkdir()  # huggingface_hub would delete ae.safetensors beside them
    save_weights(tensors, tmp_path / "sharded" / AE_WEIGHTS, shard_bytes=len(
        (src / AE_WEIGHTS).read_bytes()) // 3)
    for path in (tmp_path / "sharded").iterdir():
        shutil.copy(path, src / path.name)
    assert len([p for p in src.iterdir() if p.name.startswith("ae-")]) > 1
    import_release(str(src), str(tmp_path / "export"))
    assert {p.name for p in (tmp_path / "export" / "llm").iterdir()} == llm_files


@pytest.mark.parametrize("variant, change, problem, key", [
    ("p16_bf16", _missing("model.norm.weight"), "missing key", "model.norm.weight"),
    ("p16_bf16", _extra("model.layers.9.mlp.up_proj.weight"), "unexpected key",
     "model.layers.9.mlp.up_proj.weight"),
    ("d32c128_tied", _nan("model.layers.1.self_attn.k_proj.weight"), "NaN",
     "model.layers.1.self_attn.k_proj.weight"),
    ("d32c128_tied", _wrong_shape("model.embed_tokens.weight"), "shape mismatch",
     "model.embed_tokens.weight"),
])
def test_damaged_llm_weights_are_named_with_their_key(tmp_path, variant, change, problem, key):
    """The LLM's weights are checked at import too (transformers would only warn of an extra key
    and load a NaN); a tied model's file has no lm_head.weight, and needs none."""
    src = tmp_path / "src"
    write_variant(VARIANTS[variant], src)
    assert ("lm_head.weight" in load_file(src / "model.safetensors")) != VARIANTS[variant].tied
    _edit(src / "model.safetensors", change)
    with pytest.raises(ValueError, match=rf"{re.escape(str(src / 'model.safetensors'))}.*"
                                         rf"{problem}.*\[{re.escape(key)}[\]:]"):
        import_release(str(src), str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


def test_a_head_config_without_its_p_is_caught_by_the_query_tokens(release, tmp_path):
    """The head's weights fit any P; a vision_head_config.json without parallel_num gives
    DiffHead's default 4, which the P = 16 tokenizer's <|query_4..15|> contradict."""
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    args = json.loads((bad / HEAD_CONFIG).read_text())
    del args["parallel_num"]
    (bad / HEAD_CONFIG).write_text(json.dumps(args))
    with pytest.raises(ValueError, match=r"holds <\|query_4\|>.*vision_head_config\.json must "
                                         r"give its parallel_num"):
        import_release(str(bad), str(tmp_path / "export"))
    assert not (tmp_path / "export").exists()


def _llm_config(**changes):
    """config.json with `changes`; layer_types goes, as Qwen3 derives it from the window."""
    def change(config):
        config.pop("layer_types", None)
        config.update(changes)
    return change


def test_a_sliding_window_backbone_imports_with_its_window(release, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(release, src)
    config = json.loads((src / "config.json").read_text())
    _llm_config(use_sliding_window=True, sliding_window=8, max_window_layers=1)(config)
    (src / "config.json").write_text(json.dumps(config))
    import_release(str(src), str(tmp_path / "export"))
    model = load_trained(str(tmp_path / "export")).model
    assert model.llm.config.layer_types == ["full_attention", "sliding_attention"]
    assert model.layer_rules["sliding_attention"].window == 8


@pytest.mark.parametrize("change, problem", [
    (_llm_config(use_sliding_window=True, sliding_window=0, max_window_layers=1),
     r"sliding_window=0 of its sliding_attention layers"),
    (_llm_config(layer_types=["full_attention", "mamba"]), r"\['linear_attention'\] layers"),
    (_llm_config(attn_logit_softcapping=30.0), r"attn_logit_softcapping=30\.0"),
    (lambda config: config.update(num_hidden_layers=3),  # 2 layer_types remain
     r"not a Hugging Face causal-LM config.*num_hidden_layers"),
    (lambda config: config.update(model_type="qwen9"), r"Unrecognized model identifier: qwen9"),
])
def test_an_llm_config_bdt_cannot_load_is_refused_naming_it(release, tmp_path, change, problem):
    """What loading the export would refuse (or raise from transformers' own validation) is
    refused at import, naming the release's config.json, in one short line (transformers' own
    reasons spanned lines, or listed all its ~400 model types), and no export is written."""
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    config = json.loads((bad / "config.json").read_text())
    change(config)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{re.escape(str(bad / 'config.json'))}.*{problem}"
                       ) as error:
        import_release(str(bad), str(tmp_path / "export"))
    assert "\n" not in str(error.value) and len(str(error.value)) < 600
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_damaged_text_tokenizer_is_named_by_the_release_folder(release, tmp_path, name):
    """The tokenizer is loaded from its copy in the staged export, which is gone when the error
    is read: the error names the release's folder instead."""
    bad = tmp_path / "bad"
    shutil.copytree(release, bad)
    (bad / name).write_text("{not json")
    with pytest.raises(OSError, match=rf"cannot load a text tokenizer from "
                                      rf"'{re.escape(str(bad))}': JSONDecodeError") as error:
        import_release(str(bad), str(tmp_path / "export"))
    assert "staging" not in str(error.value)
    assert not (tmp_path / "export").exists() and list(tmp_path.iterdir()) == [bad]


def test_a_key_in_two_llm_shards_is_named_without_the_missing_shard_hint(tmp_path):
    """The hint on files left out of the LLM's folder is for a missing shard only."""
    src = tmp_path / "src"
    write_variant(VARIANTS["p1_fp16_sharded"], src)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    first, second = sorted(set(weight_map.values()))[:2]
    key = next(k for k, shard in weight_map.items() if shard == first)
    _edit(src / second, lambda tensors: tensors.update({key: load_file(src / first)[key]}))
    with pytest.raises(ValueError, match=r"key\(s\) in two shards") as error:
        import_release(str(src), str(tmp_path / "export"))
    assert str(src / "model.safetensors.index.json") in str(error.value)
    assert key in str(error.value) and "hidden files" not in str(error.value)
