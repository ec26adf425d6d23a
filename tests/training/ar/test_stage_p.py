"""A stage may train a smaller P than the model's (method §4: P = 64 grows out of P = 16): the
model needs no other parameters for it, and training at that P is training a model of that P."""

from dataclasses import replace

import pytest
import torch

from bdt.model.ar import BitDanceModel
from bdt.model.backbone_config import BackboneConfig
from bdt.model.config import ModelConfig
from bdt.model.head import HeadConfig
from bdt.model.sequence import ImageSample, SequencePacker
from bdt.model.text_tokenizer import encode
from bdt.training.ar.stage_stream import stage_packer
from trainutil import CAPTIONS, tiny_llm

EMBEDDINGS = ("llm.model.embed_tokens.weight", "llm.lm_head.weight")


def test_stage_at_p4_in_a_p16_model_is_a_p4_model(tmp_path):
    cfg16 = ModelConfig(backbone=BackboneConfig(path=tiny_llm(str(tmp_path / "llm"))),
                        head=HeadConfig(width=32, depth=2, num_adaln_sets=2, head_dim=16, bits=16),
                        parallel_num=16, attn_backend="sdpa")
    m16 = BitDanceModel.from_config(cfg16)
    m4 = BitDanceModel.from_config(replace(cfg16, parallel_num=4))
    # the P=4 vocabulary is the P=16 one without its last 12 query tokens: same weights
    rows4 = m4.llm.get_input_embeddings().weight.shape[0]
    assert m16.llm.get_input_embeddings().weight.shape[0] == rows4 + 12
    m4.load_state_dict({k: v[:rows4] if k in EMBEDDINGS else v
                        for k, v in m16.state_dict().items()})
    g = torch.Generator().manual_seed(0)
    samples = [ImageSample(encode(m16.tokenizer, c),
                           torch.where(torch.rand(4, 4 * (1 + i % 2), 16, generator=g) > 0.5, 1.0, -1.0))
               for i, c in enumerate(CAPTIONS)]
    packed16 = stage_packer(m16, 4, 4096, 0.0).pack(samples)
    packed4 = SequencePacker(m4.special, m4.prompt, 4, max_len=4096).pack(samples)
    assert torch.equal(packed16.input_ids_L, packed4.input_ids_L)  # query ids shared
    assert packed16.block_size_S.tolist() == [4] * len(samples)
    out16 = m16.train()(packed16, torch.Generator().manual_seed(3))
    out4 = m4.train()(packed4, torch.Generator().manual_seed(3))
    # the image side is identical; the text CE differs only by the 12 extra (unused) vocab rows
    assert torch.equal(out16["vision"], out4["vision"])
    assert torch.equal(out16["bit_accuracy"], out4["bit_accuracy"])
    assert out16["text_ce"] == pytest.approx(float(out4["text_ce"]), rel=0.05)
