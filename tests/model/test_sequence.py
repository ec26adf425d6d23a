"""Sequence layout and packing against tests/fixtures/bitdance/{sequence_tiny,mllm_tiny}.json."""

import dataclasses
import itertools
import json

import pytest
import torch

from bdt.model.sequence import (
    IGNORE_INDEX,
    ImageSample,
    check_grid,
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
)

import mllm_tiny
from mllm_tiny import LAYOUT, TENSORS
from reference import REF

SEQ = json.loads((REF / "sequence_tiny.json").read_text())


def test_prompt_templates_match_fixture():
    tpl = SEQ["prompt_template"]
    assert CONDITIONAL_TEMPLATE == tpl["conditional"].replace("\\n", "\n")
    assert UNCONDITIONAL_PROMPT == tpl["unconditional_pipeline (modeling/t2i_pipeline.py)"].replace("\\n", "\n")
    tables = SEQ["special_tokens"][next(k for k in SEQ["special_tokens"]
                                        if k.startswith("token_ids_by_parallel_num"))]
    for table in tables.values():
        ex = table["example"]
        assert CONDITIONAL_TEMPLATE.format(prompt=ex["prompt"]) == ex["cond_text"]
        assert UNCONDITIONAL_PROMPT == ex["uncond_text_pipeline"]


@pytest.mark.parametrize("name", sorted(SEQ["patch_raster_order"]["examples"]))
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


# --- the mllm_tiny fixture's packed batch (tests/mllm_tiny.py reads it) -----------------

def _packer_with_p(P: int, prompt: PromptIds = PromptIds((1,), (2,), (3,)), max_len: int = 4096
                   ) -> SequencePacker:
    """A packer for any P: the fixture's special tokens with P - 1 stand-in query ids (ids
    matter to no mask or layout rule)."""
    base = mllm_tiny.special_tokens()
    special = dataclasses.replace(base, query_ids=tuple(range(base.vocab_size,
                                                                base.vocab_size + P - 1)))
    return SequencePacker(special, prompt, P, max_len)


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
    P, t, layout = mllm_tiny.P, TENSORS, LAYOUT
    packed = mllm_tiny.packer().pack(mllm_tiny.samples())

    lens = (packed.cu_seqlens_S1[1:] - packed.cu_seqlens_S1[:-1]).tolist()
    assert lens == layout["sample_lens"] == t["in.sample_lens"].tolist()
    assert packed.input_ids_L.numel() == layout["sequence_length"]
    # split_lens alternate [prompt (causal), image part (parallel)]; the mask keeps
    # <|vision_start|>, <|res_h|> causal, hence causal_len = prompt + 2.
    assert packed.causal_len_S.tolist() == [n + 2 for n in layout["split_lens"][0::2]]
    assert packed.block_size_S.tolist() == [P] * len(layout["samples"])
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
    packed = mllm_tiny.packer().pack(mllm_tiny.samples())
    grids = LAYOUT["gen_vit_latent_shapes"]
    starts = [0, *itertools.accumulate(h * w for h, w in grids)]
    for (h, w), a, b in zip(grids, starts, starts[1:]):
        assert torch.equal(packed.image_rc_N2[a:b], grid_coords(h, w, mllm_tiny.PS))


def test_sequence_matches_fixture_mask_examples():
    """The sequence_tiny mask examples (one sample, several packed samples)."""
    for ex in SEQ["attention_mask"]["examples"]:
        P, splits = ex["parallel_num"], ex["split_lens"]
        ps = patch_side(P)
        # Empty template pieces, so a caption of n ids gives a prompt of exactly n tokens. The
        # image part is vision_start, res_h, then res_w + P - 1 queries, then its n_img tokens,
        # laid out as a ps x (n_img / ps) grid (the mask depends on n_img only).
        bare = _packer_with_p(P, PromptIds((), (), ()))
        samples = [ImageSample([7] * n_text, torch.ones(ps, (n_part - 2 - P) // ps, 3))
                   for n_text, n_part in zip(splits[0::2], splits[1::2])]
        packed = bare.pack(samples)
        assert (packed.cu_seqlens_S1[1:] - packed.cu_seqlens_S1[:-1]).tolist() == ex["sample_lens (document_lens)"]
        assert torch.equal(_dense_mask(packed).long(), torch.tensor(ex["mask"]))


def test_caption_dropout_is_seeded_and_uses_uncond_prefix():
    packer = mllm_tiny.packer(caption_dropout=0.5)
    samples = mllm_tiny.samples() * 4
    a = packer.pack(samples, torch.Generator().manual_seed(3))
    b = packer.pack(samples, torch.Generator().manual_seed(3))
    assert torch.equal(a.input_ids_L, b.input_ids_L)
    assert torch.equal(a.unconditional_S, b.unconditional_S)
    assert 0 < int(a.unconditional_S.sum()) < len(samples)
    cu = a.cu_seqlens_S1.tolist()
    for s in range(len(samples)):
        uncond = list(packer.prompt.uncond) + packer.image_prefix_ids(*a.grid_hw_S2[s].tolist())
        head = a.input_ids_L[cu[s] : cu[s] + len(uncond)].tolist()
        assert (head == uncond) == bool(a.unconditional_S[s] or samples[s].caption is None)
    # Vision indices still point one block before each image token after dropout.
    img_pos = a.image_mask_L.nonzero().squeeze(1)
    assert torch.equal(a.vision_loss_index_N, img_pos - mllm_tiny.P)
    never = mllm_tiny.packer().pack(samples, torch.Generator().manual_seed(3))
    assert never.unconditional_S.tolist() == [s.caption is None for s in samples]


def test_text_caption_needs_encoder_and_is_encoded():
    packer = mllm_tiny.packer()
    with pytest.raises(ValueError, match="encode_text"):
        packer.prompt_ids("a cat")
    packer.encode_text = lambda s: [len(w) for w in s.split()]
    pieces = mllm_tiny.prompt_pieces()
    assert packer.prompt_ids("a cat") == [*pieces.cond_head, 1, 3, *pieces.cond_tail]


def test_pack_errors_name_the_numbers():
    packer = _packer_with_p(4, max_len=60)  # prompts are caption + 2 template ids
    ok = ImageSample([7] * 3, torch.ones(4, 8, 16))
    with pytest.raises(ValueError, match=r"sample 1: prompt of 8 tokens .* = 46 > max_len 40"):
        _packer_with_p(4, max_len=40).pack([ImageSample([7], torch.ones(2, 2, 16)),
                                            ImageSample([7] * 6, torch.ones(4, 8, 16))])
    with pytest.raises(ValueError, match=r"sample 0: latent grid 3x8 is not divisible by the "
                                         r"patch side 2"):
        packer.pack([ImageSample([7], torch.ones(3, 8, 16))])
    with pytest.raises(ValueError, match=r"sample 1: 8 bits per token, sample 0 has 16"):
        packer.pack([ok, ImageSample([7], torch.ones(2, 2, 8))])
    with pytest.raises(ValueError, match=r"sample 0: image bits must be \+-1"):
        packer.pack([ImageSample([7], torch.zeros(2, 2, 16))])
    with pytest.raises(ValueError, match="query tokens"):
        SequencePacker(packer.special, packer.prompt, 16, 100)
    too_big = len(packer.special.res_ids) + 2
    with pytest.raises(ValueError, match=rf"<\|res_{too_big}\|>"):
        packer.image_prefix_ids(too_big, 2)


def test_grid_of_a_patch_size_it_does_not_divide_is_refused_naming_its_source():
    """P = 9 (ps 3) with a 32x120 grid: refused like the release, naming the grid's source."""
    packer = _packer_with_p(9)
    with pytest.raises(ValueError, match=r"latent grid 32x120 is not divisible by the patch side "
                                         r"3 \(P = 9\)"):
        packer.image_prefix_ids(32, 120)
    with pytest.raises(ValueError, match=r"logging.sample_hw 32x120 is not divisible"):
        check_grid(32, 120, 3, "logging.sample_hw")
    assert len(packer.image_prefix_ids(33, 120)) == 2 + 9


@pytest.mark.parametrize("P", [1, 16])
def test_layout_for_other_patch_sizes(P):
    packer = _packer_with_p(P)
    special = packer.special
    packed = packer.pack([ImageSample([9, 9], torch.ones(4, 8, 5)), ImageSample(None, -torch.ones(4, 4, 5))])
    prefix0 = [1, 9, 9, 2, special.vision_start, special.res(4), special.res(8), *special.query_ids]
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
