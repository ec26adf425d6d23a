"""BitDanceModel against the mllm_tiny fixture (reference/bitdance), LLM init, losses, config."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bdt.model.ar import BitDanceModel
from bdt.model.config import ModelConfig
from bdt.model.head import HeadConfig
from bdt.model.keymap import state_dict_from_bitdance
from bdt.model.sequence import ImageSample, SequencePacker, from_sequence_order
from bdt.model.text_tokenizer import PromptIds, SpecialTokens

REF = Path("/work/shared/reference/bitdance")
MLLM = json.loads((REF / "mllm_tiny.json").read_text())
TENSORS = load_file(REF / "mllm_tiny.safetensors")


def fixture_model() -> BitDanceModel:
    """Our model under the fixture's config, loaded from its weights via the key map."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    q = MLLM["tiny_qwen3_config (after resize; vocab_size = resized rows)"]
    llm_cfg = Qwen3Config(**{k: v for k, v in q.items() if k != "rope_theta"},
                          rope_parameters={"rope_type": "default", "rope_theta": q["rope_theta"]},
                          attn_implementation="sdpa")
    vp = MLLM["model_config (OmegaConf passed as MLLModel(config))"]["head"]["vision_pred"]
    cfg = ModelConfig(
        head=HeadConfig(width=vp["model_dim"], depth=vp["num_blocks"],
                        num_adaln_sets=vp["num_adaln"], head_dim=vp["model_dim"], bits=16,
                        p_mean=vp["P_mean"], p_std=vp["P_std"], time_shift=vp["time_shift"]),
        parallel_num=vp["parallel_num"], flip_prob=0.1, attn_backend="sdpa")
    model = BitDanceModel(cfg, Qwen3ForCausalLM(llm_cfg))
    weights = {k[len("param."):]: v.float() for k, v in TENSORS.items() if k.startswith("param.")}
    model.load_state_dict(state_dict_from_bitdance(weights), strict=True)
    return model


def fixture_packed():
    """The fixture's two samples through our packer, from token ids (no text tokenizer)."""
    ids = MLLM["token_ids"]
    samples = MLLM["batch_layout"]["samples"]
    special = SpecialTokens(
        im_start=ids["im_start"], im_end=ids["im_end"], vision_start=ids["vision_start"],
        vision_end=ids["vision_end"], res_ids=tuple(range(ids["res_1"], ids["query_1"])),
        query_ids=tuple(range(ids["query_1"], ids["query_1"] + 3)), vocab_size=1063)
    t0 = samples[0]["text_ids"]
    prompt = PromptIds(cond_head=tuple(t0[:3]), cond_tail=tuple(t0[-5:]), uncond=tuple(t0[-3:]))
    packer = SequencePacker(special, prompt, parallel_num=4, max_len=1024)
    bits = TENSORS["mid.vision_latents"]
    items, start = [], 0
    for s in samples:
        h, w = s["latent_hw"]
        grid = from_sequence_order(bits[start:start + h * w], h, w, 2)
        items.append(ImageSample(caption=s["text_ids"][3:-5], bits_HWC=grid))
        start += h * w
    return packer.pack(items)


@pytest.fixture(scope="module")
def model_and_packed():
    return fixture_model(), fixture_packed()


def test_packed_inputs_match_fixture(model_and_packed):
    _, packed = model_and_packed
    assert packed.text_loss_index_T.tolist() == TENSORS["in.ce_loss_indexes_text"].tolist()
    assert packed.text_target_T.tolist() == TENSORS["in.packed_label_ids"].tolist()
    assert packed.vision_loss_index_N.tolist() == TENSORS["in.ce_loss_indexes_vision"].tolist()
    assert packed.position_ids_L.tolist() == TENSORS["in.packed_position_ids"].tolist()


def test_hidden_state_matches_fixture(model_and_packed):
    model, packed = model_and_packed
    with torch.no_grad():
        embeds = model.input_embeddings(packed, TENSORS["mid.vision_latents_flipped"])
        torch.testing.assert_close(embeds, TENSORS["mid.llm_inputs_embeds"], atol=1e-6, rtol=1e-6)
        hidden = model.hidden_states(packed, embeds)
    torch.testing.assert_close(hidden, TENSORS["out.last_hidden_state"], atol=1e-4, rtol=1e-4)


def test_losses_match_fixture(model_and_packed):
    """Same draws as the release (flip r1, r2, then head t, noise) from the fixture's seed."""
    model, packed = model_and_packed
    model.train()
    with torch.no_grad():
        out = model(packed, generator=torch.Generator().manual_seed(104))
    ref_text = TENSORS["out.ce_loss_text"].mean()
    ref_vision = TENSORS["out.ce_loss_vision"].mean()
    torch.testing.assert_close(out["text_ce"], ref_text, rtol=1e-4, atol=0)
    torch.testing.assert_close(out["vision"], ref_vision, rtol=1e-4, atol=0)
    torch.testing.assert_close(out["total"], 0.01 * ref_text + ref_vision, rtol=1e-4, atol=0)
    assert 0.0 <= float(out["bit_accuracy"]) <= 1.0
