"""The mllm_tiny fixture (tests/fixtures/bitdance), read once for the tests that compare with it:
its release config as our ModelConfig, its special-token ids, chat-template pieces, samples and
a packer. Everything comes from the fixture's JSON, so another fixture of this format runs
through the same tests."""

from __future__ import annotations

from bdt.model.config import ModelConfig
from bdt.model.keymap import model_config_from_bitdance
from bdt.model.sequence import ImageSample, SequencePacker, from_sequence_order
from bdt.model.text_tokenizer import PromptIds, SpecialTokens

from reference import load_fixture, seed_of

MLLM, TENSORS = load_fixture("mllm_tiny")


def _entry(prefix: str):
    """The JSON entry whose (descriptive) key starts with `prefix`."""
    return MLLM[next(k for k in MLLM if k.startswith(prefix))]


RELEASE_CONFIG = _entry("model_config")  # the MLLModel config the fixture ran
QWEN3 = _entry("tiny_qwen3_config")  # vocab_size = the resized vocabulary
LAYOUT = MLLM["batch_layout"]
FORWARD_SEED = seed_of(MLLM["rng"]["call"])  # seeds the flips, then the head's t and noise


def model_config() -> ModelConfig:
    cfg = model_config_from_bitdance(RELEASE_CONFIG, QWEN3["hidden_size"])
    cfg.attn_backend = "sdpa"
    return cfg


P = model_config().parallel_num
PS = model_config().patch_size


def special_tokens() -> SpecialTokens:
    """The release adds <|res_1|>..<|res_{4096 / vit_patch_size}|>, then <|query_1|>.."""
    ids = MLLM["token_ids"]
    res = tuple(range(ids["res_1"], ids["res_1"] + 4096 // RELEASE_CONFIG["vit_patch_size"]))
    query_1 = ids.get("query_1", res[-1] + 1)
    return SpecialTokens(im_start=ids["im_start"], im_end=ids["im_end"],
                         vision_start=ids["vision_start"], vision_end=ids["vision_end"],
                         res_ids=res, query_ids=tuple(range(query_1, query_1 + P - 1)),
                         vocab_size=QWEN3["vocab_size"])


def prompt_pieces() -> PromptIds:
    """The chat template's pieces, read off the first captioned sample's ids
    (<|im_start|>user\\n {caption} <|im_end|>\\n<|im_start|>assistant\\n): the head ends at the
    first newline (the template's last id), the tail starts at the last <|im_end|> and the
    unconditional prompt at the last <|im_start|>."""
    ids = MLLM["token_ids"]
    text = next(s["text_ids"] for s in LAYOUT["samples"] if ids["im_end"] in s["text_ids"])
    tail = len(text) - 1 - text[::-1].index(ids["im_end"])
    uncond = len(text) - 1 - text[::-1].index(ids["im_start"])
    return PromptIds(cond_head=tuple(text[:text.index(text[-1]) + 1]),
                     cond_tail=tuple(text[tail:]), uncond=tuple(text[uncond:]))


def caption_ids(text_ids: list[int]) -> list[int] | None:
    """A sample's caption ids (None for the unconditional prompt)."""
    pieces = prompt_pieces()
    if text_ids == list(pieces.uncond):
        return None
    return text_ids[len(pieces.cond_head):len(text_ids) - len(pieces.cond_tail)]


def samples() -> list[ImageSample]:
    """The fixture's samples: caption ids and the bit grid (its tokens are in sequence order)."""
    bits_NC = TENSORS["mid.vision_latents"]
    out, start = [], 0
    for s in LAYOUT["samples"]:
        h, w = s["latent_hw"]
        grid = from_sequence_order(bits_NC[start:start + h * w], h, w, PS)
        out.append(ImageSample(caption=caption_ids(s["text_ids"]), bits_HWC=grid))
        start += h * w
    return out


def packer(max_len: int | None = None, caption_dropout: float = 0.0) -> SequencePacker:
    return SequencePacker(special_tokens(), prompt_pieces(), P,
                          max_len or QWEN3["max_position_embeddings"], caption_dropout)
