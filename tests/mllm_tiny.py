"""The mllm_tiny fixture (tests/fixtures/bitdance), read once for the tests that compare with it:
its release config as our ModelConfig, its special-token ids, chat-template pieces, samples and
a packer, and its weights written in a released model folder's layout (`write_release`).
Everything comes from the fixture's JSON, so another fixture of this format runs through the
same tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bdt.model.config import ModelConfig
from bdt.model.keymap import (DIFFUSERS_PORT, HEAD_CONFIG, HEAD_WEIGHTS, PORT_INDEX,
                              PROJECTOR_WEIGHTS, RELEASE, model_config_from_bitdance)
from bdt.model.sequence import ImageSample, SequencePacker, from_sequence_order
from bdt.model.text_tokenizer import PromptIds, SpecialTokens

from reference import fixture_params, load_fixture, seed_of

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


# --- the fixture as a released model folder (bdt.generation.bitdance_release) -------------------

RELEASED = fixture_params(TENSORS)  # MLLModel keys -> the fp32 weights the fixture ran with


def _components(prefix: str) -> dict[str, torch.Tensor]:
    """One released component file's tensors: MLLModel keys less the component prefix."""
    return {k[len(prefix):]: v for k, v in RELEASED.items() if k.startswith(prefix)}


def release_word_tokenizer(words: int, num_res: int, parallel_num: int):
    """A word-level tokenizer laid out as the release's: `words` base words w0.., the chat/vision
    specials, then <|res_1..num_res|> and <|query_1..P-1|> as the release adds them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>"]
    vocab = {f"w{i}": i for i in range(words)}
    vocab.update({t: words + i for i, t in enumerate(specials)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    added = [f"<|res_{k}|>" for k in range(1, num_res + 1)]
    added += [f"<|query_{j}|>" for j in range(1, parallel_num)]
    tok.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    return tok


def _text_tokenizer(out) -> None:
    """The fixture's text tokenizer: its ids, vocab = the LLM's rows."""
    ids = MLLM["token_ids"]
    tok = release_word_tokenizer(ids["im_start"] - 1, ids["query_1"] - ids["res_1"], P)
    assert len(tok) == QWEN3["vocab_size"]
    assert tok.convert_tokens_to_ids("<|res_1|>") == ids["res_1"]
    tok.save_pretrained(out)


def save_weights(tensors: dict[str, torch.Tensor], path: Path, shard_bytes: int = 0) -> None:
    """`path` (.../<name>.safetensors), or with `shard_bytes` its shards of at most that size and
    `<name>.safetensors.index.json`, written by huggingface_hub as Hugging Face tools shard."""
    if not shard_bytes:
        save_file(tensors, path)
        return
    from huggingface_hub import save_torch_state_dict

    stem = path.name.removesuffix(".safetensors")
    save_torch_state_dict(tensors, path.parent, filename_pattern=stem + "{suffix}.safetensors",
                          max_shard_size=shard_bytes)
    assert (path.parent / (path.name + ".index.json")).is_file() and not path.exists()


def write_release(out: Path, shard_bytes: int = 0) -> Path:
    """The release's layout in `out`: the LLM's HF files, then BitDance's components beside them;
    with `shard_bytes`, every weights file sharded (`save_weights`)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    llm = Qwen3ForCausalLM(Qwen3Config(**QWEN3))
    llm.load_state_dict(_components("llm_model."), strict=True)
    llm.save_pretrained(out, max_shard_size=shard_bytes or "5GB")
    _text_tokenizer(out)
    save_weights(_components("embed_vision_mlp."), out / PROJECTOR_WEIGHTS, shard_bytes)
    save_weights(_components("vision_diffusion_head."), out / HEAD_WEIGHTS, shard_bytes)
    save_weights(_components("vision_encoder."), out / "ae.safetensors", shard_bytes)
    encoder = RELEASE_CONFIG["encoder"]["params"]
    (out / "ae_config.json").write_text(json.dumps(
        {"ddconfig": encoder["ddconfig"], "gan_decoder": encoder["gan_decoder"]}))
    vp = RELEASE_CONFIG["head"]["vision_pred"]  # DiffHead's constructor arguments, as released
    (out / HEAD_CONFIG).write_text(json.dumps(dict(
        ch_target=encoder["ddconfig"]["z_channels"], ch_cond=QWEN3["hidden_size"],
        ch_latent=vp["model_dim"], depth_latent=vp["num_blocks"], depth_adanln=vp["num_adaln"],
        time_shift=vp["time_shift"], time_schedule=vp["time_schedule"], P_mean=vp["P_mean"],
        P_std=vp["P_std"], parallel_num=vp["parallel_num"], diff_batch_mul=vp["diff_batch_mul"],
        use_swiglu=vp["use_swiglu"])))
    return out


def write_diffusers_port(release: Path, out: Path, shard_bytes: int = 0) -> Path:
    """The diffusers port's layout of the (unsharded) release written by `write_release`, as its
    converter saves it: the LLM's files split into text_encoder/ and tokenizer/, each BitDance
    component in a folder of its own (config.json with diffusers' metadata, same tensors and
    keys); with `shard_bytes`, the components' weights sharded (`save_weights`)."""
    release, out = Path(release), Path(out)
    meta = {"_class_name": "BitDance", "_diffusers_version": "0.36.0"}
    for folder in ("text_encoder", "tokenizer", "autoencoder", "diffusion_head", "projector"):
        (out / folder).mkdir(parents=True)
    for path in release.iterdir():
        if path.name not in RELEASE.components:
            tokenizer_file = path.name.startswith("tokenizer") or path.name in (
                "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
            shutil.copy(path, out / ("tokenizer" if tokenizer_file else "text_encoder") / path.name)
    for theirs, ours in zip(RELEASE.components, DIFFUSERS_PORT.components):
        if theirs.endswith(".json"):
            (out / ours).write_text(json.dumps({**json.loads((release / theirs).read_text()),
                                                **meta}))
        elif shard_bytes:
            save_weights(load_file(release / theirs), out / ours, shard_bytes)
        else:
            shutil.copy(release / theirs, out / ours)
    head = json.loads((release / HEAD_CONFIG).read_text())
    (out / "projector" / "config.json").write_text(json.dumps(
        {"in_dim": head["ch_target"], "out_dim": head["ch_cond"],
         "hidden_act": "gelu_pytorch_tanh", **meta}))
    (out / PORT_INDEX).write_text(json.dumps({**meta, **{
        c: ["diffusers", "ModelMixin"] for c in ("autoencoder", "diffusion_head", "projector")},
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"]}))
    return out
