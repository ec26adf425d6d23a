"""Sequence layout and packing against tests/fixtures/bitdance/{sequence_tiny,mllm_tiny}.json."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bdt.model.sequence import (
    IGNORE_INDEX,
    ImageSample,
    SequencePacker,
    from_sequence_order,
    grid_coords,
    inverse_perm,
    patch_raster_perm,
    patch_side,
    to_sequence_order,
)
from bdt.model.text_tokenizer import (
    CONDITIONAL_TEMPLATE,
    UNCONDITIONAL_PROMPT,
    PromptIds,
    SpecialTokens,
)

from reference import REF
SEQ = json.loads((REF / "sequence_tiny.json").read_text())
MLLM = json.loads((REF / "mllm_tiny.json").read_text())


def test_prompt_templates_match_fixture():
    tpl = SEQ["prompt_template"]
    assert CONDITIONAL_TEMPLATE == tpl["conditional"].replace("\\n", "\n")
    assert UNCONDITIONAL_PROMPT == tpl["unconditional_pipeline (modeling/t2i_pipeline.py)"].replace("\\n", "\n")
    ex = SEQ["special_tokens"]["token_ids_by_parallel_num (computed by running the repo's add_* functions on the plain Qwen3 tokenizer, len 151669)"]["parallel_num_16"]["example"]
    assert CONDITIONAL_TEMPLATE.format(prompt=ex["prompt"]) == ex["cond_text"]
    assert UNCONDITIONAL_PROMPT == ex["uncond_text_pipeline"]


@pytest.mark.parametrize("name", ["8x8_ps2", "8x8_ps4", "4x8_ps2"])
def test_patch_raster_perm_matches_fixture(name):
    ex = SEQ["patch_raster_order"]["examples"][name]
    h, w = ex["grid_hw"]
    perm = patch_raster_perm(h, w, ex["ps"])
    assert perm.tolist() == ex["perm"]
    assert torch.equal(perm[inverse_perm(perm)], torch.arange(h * w))
    rc = grid_coords(h, w, ex["ps"])
    assert (rc[:, 0] * w + rc[:, 1]).tolist() == ex["perm"]


def test_sequence_order_roundtrip():
    grid_HWC = torch.randn(4, 8, 3)
    seq_NC = to_sequence_order(grid_HWC, 2)
    assert torch.equal(seq_NC[4], grid_HWC[0, 2])  # patch 1 starts at column 2 of row 0
    assert torch.equal(from_sequence_order(seq_NC, 4, 8, 2), grid_HWC)


def test_bad_patch_and_grid_errors():
    with pytest.raises(ValueError, match="perfect square"):
        patch_side(8)
    with pytest.raises(ValueError, match=r"6x8 is not divisible by the patch side 4"):
        patch_raster_perm(6, 8, 4)


# --- the mllm_tiny fixture's packed batch ---------------------------------------------------

def _fixture_packer(max_len=4096, dropout=0.0):
    ids = MLLM["token_ids"]
    P = MLLM["model_config (OmegaConf passed as MLLModel(config))"]["head"]["vision_pred"]["parallel_num"]
    num_res = ids["query_1"] - ids["res_1"]  # 1024 = 4096 / vit_patch_size 4
    special = SpecialTokens(
        im_start=ids["im_start"], im_end=ids["im_end"], vision_start=ids["vision_start"],
        vision_end=ids["vision_end"], res_ids=tuple(range(ids["res_1"], ids["res_1"] + num_res)),
        query_ids=tuple(range(ids["query_1"], ids["query_1"] + P - 1)), vocab_size=1063,
    )
    # The template pieces, read off sample 0's ids: "<|im_start|>user\n" and the tail.
    t0 = MLLM["batch_layout"]["samples"][0]["text_ids"]
    prompt = PromptIds(cond_head=tuple(t0[:3]), cond_tail=tuple(t0[-5:]), uncond=tuple(t0[-3:]))
    return SequencePacker(special, prompt, P, max_len, dropout), P


def _fixture_samples():
    t = load_file(str(REF / "mllm_tiny.safetensors"))
    latents_NC = t["mid.vision_latents"]
    samples, start = [], 0
    for s in MLLM["batch_layout"]["samples"]:
        h, w = s["latent_hw"]
        grid = from_sequence_order(latents_NC[start : start + h * w], h, w, 2)
        samples.append(ImageSample(caption=s["text_ids"][3:-5], bits_HWC=grid))
        start += h * w
    return samples, t


def _dense_mask(packed):
    """Test oracle of the documented attention rule: same sample, and key block <= query block,
    where block = position for the causal part and causal_len + (pos - causal_len) // P after it."""
    L = packed.input_ids_L.numel()
    doc = torch.empty(L, dtype=torch.long)
    blk = torch.empty(L, dtype=torch.long)
    cu = packed.cu_seqlens_S1.tolist()
    for s in range(packed.num_samples):
        pos = torch.arange(cu[s + 1] - cu[s])
        c, P = int(packed.causal_len_S[s]), int(packed.block_size_S[s])
        doc[cu[s] : cu[s + 1]] = s
        blk[cu[s] : cu[s + 1]] = torch.where(pos < c, pos, c + (pos - c) // P)
    return (doc[:, None] == doc[None, :]) & (blk[None, :] <= blk[:, None])


def test_pack_reproduces_mllm_tiny_batch_layout():
    packer, P = _fixture_packer()
    samples, t = _fixture_samples()
    layout = MLLM["batch_layout"]
    packed = packer.pack(samples)

    lens = (packed.cu_seqlens_S1[1:] - packed.cu_seqlens_S1[:-1]).tolist()
    assert lens == layout["sample_lens"] == t["in.sample_lens"].tolist()
    assert packed.input_ids_L.numel() == layout["sequence_length"]
    # split_lens alternate [prompt (causal), image part (parallel)]; the mask keeps
    # <|vision_start|>, <|res_h|> causal, hence causal_len = prompt + 2.
    assert packed.causal_len_S.tolist() == [n + 2 for n in layout["split_lens"][0::2]]
    assert packed.block_size_S.tolist() == [P, P]
    assert torch.equal(packed.position_ids_L, t["in.packed_position_ids"])
    text_pos = t["in.packed_text_indexes"]
    assert torch.equal(packed.input_ids_L[text_pos], t["in.packed_text_ids"])
    assert torch.equal(packed.image_mask_L.nonzero().squeeze(1), t["in.packed_vit_token_indexes"])
    assert not packed.image_mask_L[text_pos].any()
    assert torch.equal(packed.image_bits_NC, t["mid.vision_latents"])
    assert torch.equal(packed.text_loss_index_T, t["in.ce_loss_indexes_text"])
    assert torch.equal(packed.text_target_T, t["in.packed_label_ids"])
    assert torch.equal(packed.vision_loss_index_N, t["in.ce_loss_indexes_vision"])
    assert packed.grid_hw_S2.tolist() == layout["gen_vit_latent_shapes"]
    # The mask the facade builds from (cu_seqlens, causal_len, P) equals the reference's.
    assert torch.equal(_dense_mask(packed), t["mid.attention_mask"].bool())
    # HF labels: each sample's first label is ignored; the rest are the next-token targets.
    labels = packed.labels_L
    assert labels[packed.cu_seqlens_S1[:-1].long()].eq(IGNORE_INDEX).all()
    assert torch.equal(labels[packed.text_loss_index_T + 1], packed.text_target_T)
    assert int((labels != IGNORE_INDEX).sum()) == packed.text_target_T.numel()


def test_pos_coords_follow_sequence_order():
    packer, _ = _fixture_packer()
    samples, _ = _fixture_samples()
    packed = packer.pack(samples)
    assert torch.equal(packed.image_rc_N2[:64], grid_coords(8, 8, 2))
    assert torch.equal(packed.image_rc_N2[64:], grid_coords(4, 8, 2))


def test_sequence_matches_fixture_mask_examples():
    """The sequence_tiny mask examples: one sample and two packed samples (P = 4)."""
    packer, _ = _fixture_packer()
    # Empty template pieces, so a caption of n ids gives a prompt of exactly n tokens.
    bare = SequencePacker(packer.special, PromptIds((), (), ()), 4, 4096)
    for ex in SEQ["attention_mask"]["examples"]:
        splits = ex["split_lens"]
        # Image part = vision_start, res_h, res_w, 3 queries, then n_img tokens as a 2 x n/2 grid.
        samples = [ImageSample([7] * n_text, torch.ones(2, (n_part - 6) // 2, 3))
                   for n_text, n_part in zip(splits[0::2], splits[1::2])]
        packed = bare.pack(samples)
        assert (packed.cu_seqlens_S1[1:] - packed.cu_seqlens_S1[:-1]).tolist() == ex["sample_lens (document_lens)"]
        assert torch.equal(_dense_mask(packed).long(), torch.tensor(ex["mask"]))


def test_caption_dropout_is_seeded_and_uses_uncond_prefix():
    packer, _ = _fixture_packer(dropout=0.5)
    samples, _ = _fixture_samples()
    samples = samples * 4
    a = packer.pack(samples, torch.Generator().manual_seed(3))
    b = packer.pack(samples, torch.Generator().manual_seed(3))
    assert torch.equal(a.input_ids_L, b.input_ids_L)
    assert torch.equal(a.unconditional_S, b.unconditional_S)
    assert 0 < int(a.unconditional_S.sum()) < len(samples)
    cu = a.cu_seqlens_S1.tolist()
    for s in range(len(samples)):
        uncond = list(packer.prompt.uncond) + packer.image_prefix_ids(*a.grid_hw_S2[s].tolist())
        head = a.input_ids_L[cu[s] : cu[s] + len(uncond)].tolist()
        assert (head == uncond) == bool(a.unconditional_S[s])
    # Vision indices still point one block before each image token after dropout.
    img_pos = a.image_mask_L.nonzero().squeeze(1)
    assert torch.equal(a.vision_loss_index_N, img_pos - 4)
    never = _fixture_packer(dropout=0.0)[0].pack(samples, torch.Generator().manual_seed(3))
    assert not never.unconditional_S.any()


def test_text_caption_needs_encoder_and_is_encoded():
    packer, _ = _fixture_packer()
    with pytest.raises(ValueError, match="encode_text"):
        packer.prompt_ids("a cat")
    packer.encode_text = lambda s: [len(w) for w in s.split()]
    assert packer.prompt_ids("a cat") == [31, 5, 1, 1, 3, 32, 1, 31, 6, 1]


def test_pack_errors_name_the_numbers():
    packer, _ = _fixture_packer(max_len=60)
    ok = ImageSample([7] * 3, torch.ones(4, 8, 16))
    with pytest.raises(ValueError, match=r"sample 1: prompt of 14 tokens .* = 52 > max_len 40"):
        SequencePacker(packer.special, packer.prompt, 4, 40).pack([ImageSample([7], torch.ones(2, 2, 16)),
                                                                   ImageSample([7] * 6, torch.ones(4, 8, 16))])
    with pytest.raises(ValueError, match=r"latent grid 3x8 is not divisible by the patch side 2"):
        packer.pack([ImageSample([7], torch.ones(3, 8, 16))])
    with pytest.raises(ValueError, match=r"sample 1: 8 bits per token, sample 0 has 16"):
        packer.pack([ok, ImageSample([7], torch.ones(2, 2, 8))])
    with pytest.raises(ValueError, match=r"sample 0: image bits must be \+-1"):
        packer.pack([ImageSample([7], torch.zeros(2, 2, 16))])
    with pytest.raises(ValueError, match="query tokens"):
        SequencePacker(packer.special, packer.prompt, 16, 100)
    with pytest.raises(ValueError, match=r"<\|res_1026\|>"):
        packer.image_prefix_ids(1026, 2)


@pytest.mark.parametrize("P", [1, 16])
def test_layout_for_other_patch_sizes(P):
    base = _fixture_packer()[0].special
    special = SpecialTokens(base.im_start, base.im_end, base.vision_start, base.vision_end,
                            base.res_ids, tuple(range(2000, 2000 + P - 1)), 3000)
    packer = SequencePacker(special, PromptIds((1,), (2,), (3,)), P, 4096)
    packed = packer.pack([ImageSample([9, 9], torch.ones(4, 8, 5)), ImageSample(None, -torch.ones(4, 4, 5))])
    prefix0 = [1, 9, 9, 2, base.vision_start, base.res(4), base.res(8), *special.query_ids]
    assert packed.input_ids_L[: len(prefix0)].tolist() == prefix0
    res_w = [4 + 2, packed.cu_seqlens_S1[1].item() + 1 + 2]  # prompt + vision_start + res_h
    img = packed.image_mask_L.nonzero().squeeze(1)
    assert packed.vision_loss_index_N.tolist() == (img - P).tolist()
    assert packed.vision_loss_index_N[[0, 32]].tolist() == res_w
    assert packed.unconditional_S.tolist() == [False, True]
    mask = _dense_mask(packed)
    if P == 1:  # degenerates to plain causal attention inside each sample
        assert torch.equal(mask[:39, :39], torch.ones(39, 39).tril().bool())
    else:  # the 16 tokens from <|res_w|> on see each other
        assert mask[res_w[0], res_w[0] : res_w[0] + 16].all()
        assert not mask[res_w[0], res_w[0] + 16]
