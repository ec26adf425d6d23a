"""Backbone loading, special tokens, embedding resize and the tiny LLM of the embedded default."""

import json
import os
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config

from bdt.model.backbone import (
    backbone_key_map,
    load_backbone,
    load_causal_lm,
    make_tiny_llm,
    resize_embeddings,
)
from bdt.model.backbone_config import BackboneConfig
from bdt.model.text_tokenizer import (
    CONDITIONAL_TEMPLATE,
    IM_START,
    VISION_END,
    VISION_START,
    add_special_tokens,
    encode,
    load_text_tokenizer,
    make_text_tokenizer,
    prompt_ids,
    train_sentencepiece,
)

from reference import REF
SEQ = json.loads((REF / "sequence_tiny.json").read_text())
CAPTIONS = [
    f"a {c} {s} on the {p}"
    for c in ("red", "blue", "green", "yellow")
    for s in ("circle", "square", "triangle")
    for p in ("left", "right", "top", "bottom")
]


@pytest.fixture(scope="module")
def llm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {a: make_tiny_llm(str(root / a), CAPTIONS, arch=a, hidden=32, heads=4, kv_heads=2,
                             intermediate=64) for a in ("qwen3", "qwen2", "llama")}


def test_sentencepiece_tokenizer_roundtrip(tmp_path):
    tok = make_text_tokenizer(str(tmp_path / "tok"), CAPTIONS)
    assert os.path.isfile(tmp_path / "tok" / "tokenizer.model")
    text = CONDITIONAL_TEMPLATE.format(prompt="a green triangle on the top")
    ids = encode(tok, text)
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids(IM_START)  # chat tokens are single special tokens
    unk = tok.convert_tokens_to_ids("<unk>")
    assert unk not in encode(tok, "a purple hexagon, 42%!")  # byte fallback: nothing is <unk>
    chat = tok.apply_chat_template([{"role": "user", "content": "a red circle on the left"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == CONDITIONAL_TEMPLATE.format(prompt="a red circle on the left")
    # Caption ids spliced between the template pieces equal tokenizing the whole prompt.
    assert prompt_ids(tok).build(encode(tok, "a red circle on the left")) == encode(
        tok, CONDITIONAL_TEMPLATE.format(prompt="a red circle on the left"))


def test_bare_sentencepiece_dir_loads(tmp_path):
    """A directory holding only tokenizer.model (how SentencePiece LLMs ship) loads and encodes."""
    (tmp_path / "tokenizer.model").write_bytes(train_sentencepiece(CAPTIONS))
    tok = load_text_tokenizer(str(tmp_path))
    ids = encode(tok, "a blue square on the right")
    assert len(ids) > 0 and tok.decode(ids) == "a blue square on the right"


def test_special_token_id_rules(tmp_path):
    tok = make_text_tokenizer(str(tmp_path / "tok"), CAPTIONS)
    # Make it Qwen-like: chat and vision tokens already present; then the rules are base + k.
    tok.add_special_tokens({"additional_special_tokens": [VISION_START, VISION_END]},
                           replace_extra_special_tokens=False)
    base = len(tok)
    sp = add_special_tokens(tok, parallel_num=16)
    assert sp.vision_start == tok.convert_tokens_to_ids(VISION_START) < base
    assert sp.res_ids == tuple(range(base, base + 256))
    assert sp.query_ids == tuple(range(base + 256, base + 256 + 15))
    assert sp.vocab_size == len(tok) == base + 256 + 15
    assert encode(tok, "<|res_64|><|query_3|>") == [sp.res(64), sp.query_ids[2]]
    assert add_special_tokens(tok, parallel_num=16) == sp  # idempotent
    with pytest.raises(ValueError, match=r"<\|res_257\|>"):
        sp.res(257)
    # The same rule with the real Qwen3 base length reproduces the fixture's recorded ids.
    table = SEQ["special_tokens"][next(k for k in SEQ["special_tokens"] if k.startswith("token_ids_by"))]
    for name, entry in table.items():
        P = int(name.removeprefix("parallel_num_"))
        qbase = entry["base_qwen3_tokenizer_len"]
        ids = entry["ids"]
        n_res = max(int(k[len("<|res_"):-len("|>")]) for k in ids if k.startswith("<|res_"))
        assert n_res == len(sp.res_ids)
        assert ids["<|res_1|>"] == qbase and ids[f"<|res_{n_res}|>"] == qbase + n_res - 1
        if P > 1:
            assert ids["<|query_1|>"] == qbase + n_res
            assert ids[f"<|query_{P - 1}|>"] == qbase + n_res + P - 2
        rows = next(v for k, v in entry.items() if k.startswith("len_after_additions"))
        assert rows == qbase + n_res + P - 1


def test_a_tokenizer_keeps_the_res_tokens_it_holds(tmp_path):
    """A 32x-down release holds <|res_1..128|> (4096 px / 32) then its query tokens: loading it
    adds nothing (256 res tokens would grow the vocabulary past the released embedding)."""
    tok = make_text_tokenizer(str(tmp_path / "tok"), CAPTIONS)
    added = [f"<|res_{k}|>" for k in range(1, 129)] + [f"<|query_{j}|>" for j in range(1, 4)]
    tok.add_special_tokens({"additional_special_tokens": [VISION_START, VISION_END, *added]},
                           replace_extra_special_tokens=False)
    size = len(tok)
    sp = add_special_tokens(tok, parallel_num=4)
    assert len(tok) == sp.vocab_size == size and len(sp.res_ids) == 128
    assert sp.res(128) == tok.convert_tokens_to_ids("<|res_128|>") == sp.query_ids[0] - 1


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_backbone_adds_tokens_without_changing_text_logits(llm_dirs, arch):
    path = llm_dirs[arch]
    original = AutoModelForCausalLM.from_pretrained(path).eval()
    n_old = original.get_input_embeddings().weight.shape[0]
    bb = load_backbone(BackboneConfig(path=path), parallel_num=4)
    model = bb.model.eval()
    assert type(model).__name__.lower().startswith(arch)
    assert model.get_input_embeddings().weight.shape[0] == bb.special.vocab_size == n_old + 2 + 256 + 3
    assert model.get_output_embeddings().weight.shape[0] == bb.special.vocab_size
    # New rows are the mean of the old rows, in both embeddings (untied).
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        torch.testing.assert_close(emb.weight[n_old:], emb.weight[:n_old].mean(0).expand(bb.special.vocab_size - n_old, -1))
    ids = torch.tensor([bb.prompt.build(encode(bb.tokenizer, "a red circle on the left"))])
    with torch.no_grad():
        want = original(input_ids=ids, use_cache=False).logits
        got = model(input_ids=ids, use_cache=False).logits
    assert got.shape[-1] == bb.special.vocab_size
    torch.testing.assert_close(got[..., :n_old], want, atol=1e-6, rtol=1e-6)


def test_tiny_llm_is_seeded_and_roundtrips(llm_dirs, tmp_path):
    again = make_tiny_llm(str(tmp_path / "again"), CAPTIONS, hidden=32, heads=4, kv_heads=2, intermediate=64)
    a = load_file(os.path.join(llm_dirs["qwen3"], "model.safetensors"))
    b = load_file(os.path.join(again, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_causal_lm(BackboneConfig(path=again)).state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)


def test_from_scratch_and_dtype(llm_dirs):
    path = llm_dirs["qwen3"]
    # As the typed config tree hands it over: a read-only omegaconf object.
    cfg = OmegaConf.structured(BackboneConfig(path=path, from_scratch=True, config_overrides={"num_hidden_layers": 1},
                                              dtype="bfloat16"))
    OmegaConf.set_readonly(cfg, True)
    model = load_causal_lm(cfg)
    assert model.config.num_hidden_layers == 1
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    saved = load_file(os.path.join(path, "model.safetensors"))
    w = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(w.float(), saved["model.layers.0.mlp.up_proj.weight"].float())
    model.train()
    loss = model(input_ids=torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]]), use_cache=False).loss
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_backbone_errors(tmp_path, llm_dirs):
    with pytest.raises(OSError, match="does not exist"):
        load_causal_lm(BackboneConfig(path=str(tmp_path / "nope")))
    with pytest.raises(OSError, match="has no config.json"):
        load_backbone(BackboneConfig(path=str(tmp_path)), parallel_num=4)
    with pytest.raises(ValueError, match="'int8' is not a torch floating dtype"):
        load_causal_lm(BackboneConfig(path=llm_dirs["qwen3"], dtype="int8"))
    with pytest.raises(ValueError, match="cannot build the backbone .*nonsense"):
        load_causal_lm(BackboneConfig(path=llm_dirs["qwen3"], attn_implementation="nonsense"))
    with pytest.raises(ValueError, match="empty"):
        load_causal_lm(BackboneConfig())


@pytest.mark.parametrize("from_scratch", [False, True])
def test_config_overrides_naming_no_config_field_are_refused(llm_dirs, from_scratch):
    """transformers kept them as attributes and passed them to the model's constructor: a
    TypeError traceback ('unexpected keyword argument') once the model was being built; a key
    written `{num_hidden_layers:1}` (no space: one key, no value) is one of them."""
    cfg = BackboneConfig(path=llm_dirs["qwen3"], from_scratch=from_scratch,
                         config_overrides={"num_hidden_layers:1": None, "not_a_field": 3})
    with pytest.raises(ValueError, match=r"^model\.backbone\.config_overrides: \['not_a_field', "
                                         r"'num_hidden_layers:1'\] are not fields of Qwen3Config"):
        load_backbone(cfg, parallel_num=4)


def _copy_with_weights(src: str, dst, edit) -> str:
    """A copy of the LLM directory `src` whose model.safetensors went through `edit`."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    save_file(edit(load_file(os.path.join(src, "model.safetensors"))), dst / "model.safetensors")
    return str(dst)


@pytest.mark.parametrize("edit, named", [
    (lambda sd: {k: v for k, v in sd.items() if k != "model.norm.weight"},
     r"1 missing parameter\(s\) \[model\.norm\.weight\]"),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, r"unknown key\(s\) \[module\."),
    # a layer past num_hidden_layers was dropped, with a warning only
    (lambda sd: {**sd, **{k.replace("layers.0.", "layers.9."): v.clone() for k, v in sd.items()
                          if "layers.0." in k}}, r"unknown key\(s\) \[model\.layers\.9\."),
    (lambda sd: {**sd, "model.norm.weight": sd["model.norm.weight"][:-1].clone()},
     r"model\.norm\.weight: expected \[32\] got \[31\]"),
])
def test_llm_weights_that_do_not_fit_are_refused(llm_dirs, tmp_path, edit, named):
    """transformers would initialise a missing or mis-shaped parameter at random (a warning only)."""
    path = _copy_with_weights(llm_dirs["qwen3"], tmp_path / "llm", edit)
    with pytest.raises(ValueError, match="its weights do not fit its config: .*" + named):
        load_causal_lm(BackboneConfig(path=path))


def test_tied_output_embedding_may_be_absent(llm_dirs, tmp_path):
    path = _copy_with_weights(llm_dirs["qwen3"], tmp_path / "llm",
                              lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"})
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    model = load_causal_lm(BackboneConfig(path=path))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("absolute", [False, True])
def test_shard_index_naming_a_file_outside_the_folder_is_refused(llm_dirs, tmp_path, absolute):
    """transformers joined the index's shard names to the folder as they are and loaded the
    weights of whatever file they named, e.g. ../elsewhere/x.safetensors."""
    folder, elsewhere = tmp_path / "llm", tmp_path / "elsewhere"
    shutil.copytree(llm_dirs["qwen3"], folder)
    elsewhere.mkdir()
    keys = list(load_file(folder / "model.safetensors"))
    shutil.move(folder / "model.safetensors", elsewhere / "x.safetensors")
    index = folder / "model.safetensors.index.json"
    shard = str(elsewhere / "x.safetensors") if absolute else "../elsewhere/x.safetensors"
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, shard)}))
    with pytest.raises(ValueError, match=r"cannot build the backbone .*index\.json: shard "
                                         r"name\(s\) \[.*x\.safetensors\] refused"):
        load_causal_lm(BackboneConfig(path=str(folder)))
    shutil.move(elsewhere / "x.safetensors", folder / "x.safetensors")  # beside its index: loads
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(keys, "x.safetensors")}))
    load_causal_lm(BackboneConfig(path=str(folder)))


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_backbone_from_given_weights_reads_no_pretrained_weights(llm_dirs, tmp_path, arch):
    """Given the resized LM's state dict (a training checkpoint's), the backbone is built from the
    folder's config and tokenizer alone: the pretrained weights may be gone, the model computes
    with the given tensors (rotary tables included), in the configured dtype."""
    bb = load_backbone(BackboneConfig(path=llm_dirs[arch]), parallel_num=4)
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in bb.model.state_dict().items()}
    bb.model.load_state_dict(trained)
    folder = tmp_path / "llm"
    shutil.copytree(llm_dirs[arch], folder)
    os.remove(folder / "model.safetensors")
    again = load_backbone(BackboneConfig(path=str(folder)), parallel_num=4, weights=trained)
    state = again.model.state_dict()
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in trained)
    ids = torch.tensor([bb.prompt.build(encode(bb.tokenizer, "a red circle on the left"))])
    with torch.no_grad():
        torch.testing.assert_close(again.model.eval()(input_ids=ids, use_cache=False).logits,
                                   bb.model.eval()(input_ids=ids, use_cache=False).logits,
                                   atol=0, rtol=0)
    half = load_backbone(BackboneConfig(path=str(folder), dtype="bfloat16"), 4, weights=trained)
    assert all(p.dtype == torch.bfloat16 for p in half.model.parameters())
    without_norm = {k: v for k, v in trained.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match=r"1 missing parameter\(s\) \[model\.norm\.weight\]"):
        load_backbone(BackboneConfig(path=str(folder)), parallel_num=4, weights=without_norm)


def test_key_map_matches_mllm_tiny_llm_keys():
    """Our backbone built with the fixture's tiny Qwen3 config has exactly BitDance's llm keys/shapes."""
    meta = json.loads((REF / "mllm_tiny.json").read_text())
    hf = Qwen3Config(**meta["tiny_qwen3_config (after resize; vocab_size = resized rows)"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    resize_embeddings(model, hf.vocab_size)
    ref = {k[len("param."):]: v.shape for k, v in load_file(str(REF / "mllm_tiny.safetensors")).items()
           if k.startswith("param.llm_model.")}
    mapping = backbone_key_map(model, prefix="llm.")
    assert mapping.keys() == ref.keys()
    ours = model.state_dict()
    assert all(ours[v[len("llm."):]].shape == ref[k] for k, v in mapping.items())
