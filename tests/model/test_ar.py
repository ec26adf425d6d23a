"""BitDanceModel against the mllm_tiny fixture (tests/fixtures/bitdance), LLM init, losses, config."""

import pytest
import torch

from bdt.model.ar import BitDanceModel
from bdt.model.config import ModelConfig
from bdt.model.head import HeadConfig
from bdt.model.keymap import state_dict_from_bitdance
from bdt.model.sequence import ImageSample, SequencePacker

import mllm_tiny
from mllm_tiny import TENSORS
from reference import fixture_params


def fixture_model() -> BitDanceModel:
    """Our model under the fixture's config, loaded from its weights via the key map."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = mllm_tiny.model_config()
    llm = Qwen3ForCausalLM(Qwen3Config(**mllm_tiny.QWEN3, attn_implementation="sdpa"))
    model = BitDanceModel(cfg, llm)
    model.load_state_dict(state_dict_from_bitdance(fixture_params(TENSORS), cfg.head.mlp),
                          strict=True)
    return model


@pytest.fixture(scope="module")
def model_and_packed():
    """The fixture's samples through our packer, from token ids (no text tokenizer)."""
    return fixture_model(), mllm_tiny.packer().pack(mllm_tiny.samples())


def test_packed_inputs_match_fixture(model_and_packed):
    _, packed = model_and_packed
    assert packed.text_loss_index_T.tolist() == TENSORS["in.ce_loss_indexes_text"].tolist()
    assert packed.text_target_T.tolist() == TENSORS["in.packed_label_ids"].tolist()
    assert packed.vision_loss_index_N.tolist() == TENSORS["in.ce_loss_indexes_vision"].tolist()
    assert packed.position_ids_L.tolist() == TENSORS["in.packed_position_ids"].tolist()


def test_hidden_state_matches_fixture(model_and_packed):
    model, packed = model_and_packed
    P, D = model.cfg.parallel_num, model.llm.config.hidden_size
    with torch.no_grad():
        embeds = model.input_embeddings(packed, TENSORS["mid.vision_latents_flipped"])
        torch.testing.assert_close(embeds, TENSORS["mid.llm_inputs_embeds"], atol=1e-6, rtol=1e-6)
        hidden = model.hidden_states(packed, embeds)
        cond = model.head_condition(hidden[packed.vision_loss_index_N], packed.image_rc_N2)
        # The head on the fixture's own t and z (injected, independent of any RNG stream); with
        # diff_batch_mul = r the release scores the patches r times, stacked along the batch.
        x_pred = model.head(TENSORS["mid.head_z"], TENSORS["mid.head_t"],
                            cond.view(-1, P, D).repeat(model.cfg.head.repeat, 1, 1))
    torch.testing.assert_close(hidden, TENSORS["out.last_hidden_state"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cond.view(-1, P, D), TENSORS["mid.head_cond"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_pred, TENSORS["mid.head_x_pred"], atol=1e-4, rtol=1e-4)


def test_losses_match_fixture(model_and_packed):
    """Same draws as the release (flip r1, r2, then head t, noise) from the fixture's seed."""
    model, packed = model_and_packed
    model.train()
    with torch.no_grad():
        out = model(packed, generator=torch.Generator().manual_seed(mllm_tiny.FORWARD_SEED))
    ref_text = TENSORS["out.ce_loss_text"].mean()
    ref_vision = TENSORS["out.ce_loss_vision"].mean()
    torch.testing.assert_close(out["text_ce"], ref_text, rtol=1e-4, atol=0)
    torch.testing.assert_close(out["vision"], ref_vision, rtol=1e-4, atol=0)
    torch.testing.assert_close(out["total"], model.cfg.text_loss_weight * ref_text
                               + model.cfg.vision_loss_weight * ref_vision, rtol=1e-4, atol=0)
    assert 0.0 <= float(out["bit_accuracy"]) <= 1.0


# --- a tiny Qwen3 through the real from_pretrained path ----------------------------------------

CAPTIONS = ["a red circle", "a blue square on the left", "two green stars"]


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from bdt.model.backbone import make_tiny_llm

    return make_tiny_llm(str(tmp_path_factory.mktemp("tiny_llm")), CAPTIONS)


def tiny_config(llm_dir, **overrides) -> ModelConfig:
    from bdt.model.backbone_config import BackboneConfig

    kwargs = {"parallel_num": 4, "attn_backend": "sdpa", **overrides}
    return ModelConfig(backbone=BackboneConfig(path=llm_dir),
                       head=HeadConfig(width=32, depth=2, num_adaln_sets=2, head_dim=16, bits=8),
                       **kwargs)


def tiny_packed(model: BitDanceModel, seed: int = 0, samples: int = len(CAPTIONS)):
    from bdt.model.text_tokenizer import encode

    g = torch.Generator().manual_seed(seed)
    packer = SequencePacker(model.special, model.prompt, 4, max_len=4096,
                            encode_text=lambda s: encode(model.tokenizer, s))
    return packer.pack([ImageSample(c, torch.where(torch.rand(4, 2 + 2 * i, 8, generator=g) > 0.5,
                                                   1.0, -1.0))
                        for i, c in enumerate(CAPTIONS[:samples])])


def test_llm_init_keeps_the_llm(llm_dir):
    """Text-only rows through the wrapper give the original LLM's logits (vocab rows it had)."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(llm_dir, attn_implementation="sdpa").eval()
    model = BitDanceModel.from_config(tiny_config(llm_dir)).eval()
    vocab = original.config.vocab_size
    assert model.llm.config.vocab_size > vocab  # res/query tokens were added
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.text_logits(ids)
        theirs = original(input_ids=ids).logits
    assert ours.shape[-1] == model.llm.config.vocab_size
    torch.testing.assert_close(ours[..., :vocab], theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config_class, transform", [
    ("Gemma3TextConfig", {"final_logit_softcapping": 2.0}),
    ("CohereConfig", {"logit_scale": 0.25}),
    ("GraniteConfig", {"logits_scaling": 4.0}),
    ("MistralConfig", {"sliding_window": 3}),
    ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
])
def test_text_loss_is_the_backbones_own_loss(llm_dir, tmp_path, config_class, transform):
    """Gemma 2 and 3 soft-cap their LM head's output, Cohere multiplies it, Granite divides it: the text
    CE of the plain LM head output was not the loss the pretrained LM was trained with. Mistral's
    and Qwen2's sliding windows: the masks spanned the whole sample, wider than the backbone's."""
    import transformers
    from transformers import AutoTokenizer

    from bdt.model.backbone_config import BackboneConfig

    folder = str(tmp_path / "llm")
    AutoTokenizer.from_pretrained(llm_dir).save_pretrained(folder)
    getattr(transformers, config_class)(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, **transform).save_pretrained(folder)
    cfg = tiny_config(folder)
    cfg.backbone = BackboneConfig(path=folder, from_scratch=True)
    model = BitDanceModel.from_config(cfg).eval()
    with torch.no_grad():  # logits large enough for the cap to bend them
        model.llm.get_output_embeddings().weight.mul_(50.0)
    packed = tiny_packed(model, samples=1)
    labels = torch.full_like(packed.input_ids_L, -100)
    labels[packed.text_loss_index_T + 1] = packed.text_target_T  # HF shifts labels by one
    with torch.no_grad():
        ours = model(packed)["text_ce"]
        embeds = model.input_embeddings(packed, packed.image_bits_NC)  # causal: same text hidden
        theirs = model.llm(inputs_embeds=embeds[None], labels=labels[None]).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_save_and_load_roundtrip(llm_dir, tmp_path):
    model = BitDanceModel.from_config(tiny_config(llm_dir, text_loss_weight=0.5)).eval()
    with torch.no_grad():  # make the head's zero-initialised layers non-trivial
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(tmp_path / "export"))
    loaded = BitDanceModel.from_pretrained(str(tmp_path / "export")).eval()
    assert loaded.cfg.text_loss_weight == 0.5 and loaded.special == model.special
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    packed = tiny_packed(model)
    with torch.no_grad():
        a = model(packed, generator=torch.Generator().manual_seed(3))
        b = loaded(packed, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["total"], b["total"])
    with pytest.raises(OSError, match="not a saved BitDanceModel"):
        BitDanceModel.from_pretrained(str(tmp_path))


def test_activation_checkpointing_gives_the_same_gradients(llm_dir):
    plain = BitDanceModel.from_config(tiny_config(llm_dir)).train()
    ckpt = BitDanceModel.from_config(tiny_config(llm_dir, activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.llm.is_activation_checkpointing and ckpt.head.activation_checkpointing  # one switch
    packed = tiny_packed(plain)
    grads = []
    for model in (plain, ckpt):
        out = model(packed, generator=torch.Generator().manual_seed(4))
        out["total"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) > 0
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_one_row_per_sample_equals_the_packed_row(llm_dir):
    """sdpa: the packed row re-laid as one padded row per sample (cheaper when the dense mask
    would mostly compute pairs across samples) gives the packed row's losses and gradients."""
    from bdt.model.attention_masks import per_document_rows

    model = BitDanceModel.from_config(tiny_config(llm_dir)).train()
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: the zero-initialised head ignores its condition
        for p in model.head.parameters():
            p.normal_(0.0, 0.1)
    packed = tiny_packed(model)
    lengths = packed.cu_seqlens_S1.diff()
    assert len(set(lengths.tolist())) > 1  # unequal samples: the rows carry padding
    rows, index = per_document_rows(packed.cu_seqlens_S1, packed.causal_len_S,
                                    packed.block_size_S, token_cost=0.0, pair_cost=1.0)
    assert rows.doc_ids_BL.shape == (len(lengths), int(lengths.max()))
    assert len(set(index.tolist())) == int(lengths.sum())
    # a row whose samples fill it nearly alone stays packed: padding would cost more
    assert per_document_rows(packed.cu_seqlens_S1, packed.causal_len_S, packed.block_size_S,
                             token_cost=1.0, pair_cost=0.0) is None
    results = []
    for costs in ((0.0, 1.0), (1.0, 0.0)):  # split, then packed
        model.zero_grad()
        model._layer_costs = costs
        out = model(packed, generator=torch.Generator().manual_seed(4))
        out["total"].backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()
                              if p.grad is not None}))
    (split, g_split), (whole, g_whole) = results
    for key in ("total", "text_ce", "vision"):
        torch.testing.assert_close(split[key], whole[key], atol=1e-5, rtol=1e-5, msg=key)
    assert sorted(g_split) == sorted(g_whole) and len(g_split) > 0
    for name, g in g_whole.items():
        torch.testing.assert_close(g_split[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_bad_model_config(llm_dir):
    with pytest.raises(ValueError, match="attn_backend: unknown attention backend 'xformers'"):
        BitDanceModel.from_config(tiny_config(llm_dir, attn_backend="xformers"))
    with pytest.raises(ValueError, match="model.parallel_num"):
        tiny_config(llm_dir, parallel_num=8).validate()
    with pytest.raises(ValueError, match="model.flip_prob"):
        tiny_config(llm_dir, flip_prob=1.5).validate()
