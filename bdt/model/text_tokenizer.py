"""Text tokenizer side of the AR model: BitDance's added special tokens, the chat-template pieces,
and a SentencePiece tokenizer trained on captions for the embedded default (method §2, system §4).

Token-id rules (tests/fixtures/bitdance/sequence_tiny.json "special_tokens"): missing chat/vision
tokens are appended first, then ``<|res_1|>..<|res_{num_res}|>`` (``<|res_k|>`` = k latent tokens
along an axis, i.e. k*16 px with a 16x tokenizer), then ``<|query_1|>..<|query_{P-1}|>``. On the
real Qwen3 tokenizer (151669 tokens, chat and vision tokens present) this gives res_k = 151668 + k
and query_j = 151924 + j, the ids of the released checkpoints.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is slow to import; data-side users only need the dataclasses.
    from transformers import PreTrainedTokenizerBase

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# method §2 / fixture "prompt_template": conditional and unconditional (CFG) prefixes.
CONDITIONAL_TEMPLATE = IM_START + "user\n{prompt}" + IM_END + "\n" + IM_START + "assistant\n"
UNCONDITIONAL_PROMPT = IM_START + "assistant\n"
# Chat template stored in the tiny tokenizer directory so `apply_chat_template` produces the
# same conditional prefix (single user turn + generation prompt).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_NUM_RES = 256  # 4096 px / 16 (BitDance: 4096 // vit_patch_size)
MAX_SIDE_PX = 4096  # the release's res tokens and 2D position table cover 4096 px per side


def release_num_res(downsample: int) -> int:
    """How many <|res_k|> a released model's tokenizer holds: 4096 // its downsample factor
    (256 at 16x, 128 at 32x)."""
    return MAX_SIDE_PX // downsample


def res_token(k: int) -> str:
    return f"<|res_{k}|>"


def query_token(j: int) -> str:
    return f"<|query_{j}|>"


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the image part of a sequence uses (after `add_special_tokens`)."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    res_ids: tuple[int, ...]  # res_ids[k-1] = id of <|res_k|>, k = latent tokens along one axis
    query_ids: tuple[int, ...]  # query_ids[j-1] = id of <|query_j|>; P-1 of them
    vocab_size: int  # len(tokenizer) after the additions = rows of embed_tokens / lm_head

    def res(self, k: int) -> int:
        if not 1 <= k <= len(self.res_ids):
            raise ValueError(
                f"no <|res_{k}|> token: a latent side of {k} tokens is outside 1..{len(self.res_ids)}"
            )
        return self.res_ids[k - 1]


@dataclass(frozen=True)
class PromptIds:
    """Token ids of the fixed chat-template pieces; a caption's own ids go between head and tail.

    Pieces are tokenized separately so that a caption given as ids and the same caption given as
    text produce identical sequences (with Qwen's BPE this equals tokenizing the whole string).
    """

    cond_head: tuple[int, ...]  # "<|im_start|>user\n"
    cond_tail: tuple[int, ...]  # "<|im_end|>\n<|im_start|>assistant\n"
    uncond: tuple[int, ...]  # "<|im_start|>assistant\n"

    def build(self, caption_ids: Sequence[int] | None) -> list[int]:
        """Conditional prefix for ``caption_ids``; the unconditional one for None."""
        if caption_ids is None:
            return list(self.uncond)
        return [*self.cond_head, *caption_ids, *self.cond_tail]


def encode(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    """Plain ids of ``text``: no BOS/EOS (Qwen has none; the template supplies the structure).
    Special-token strings become their tokens: for bdt's own templates, never for user text."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_user_text(tokenizer: "PreTrainedTokenizerBase", text: str) -> list[int]:
    """Ids of a caption or prompt: a special token's string in it (``<|im_end|>``) is plain text,
    so no prompt can end the user turn or forge an image header, and prompts are encoded as the
    trainer encodes captions (CaptionMeasure)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def prompt_ids(tokenizer: "PreTrainedTokenizerBase") -> PromptIds:
    head, tail = CONDITIONAL_TEMPLATE.split("{prompt}")
    return PromptIds(
        cond_head=tuple(encode(tokenizer, head)),
        cond_tail=tuple(encode(tokenizer, tail)),
        uncond=tuple(encode(tokenizer, UNCONDITIONAL_PROMPT)),
    )


def bitdance_tokens(parallel_num: int, num_res: int = DEFAULT_NUM_RES) -> list[str]:
    """The chat/vision tokens, <|res_1..num_res|> and <|query_1..P-1|>, in the order they are
    added."""
    if parallel_num < 1:
        raise ValueError(f"parallel_num (P) must be >= 1, got {parallel_num}")
    return ([IM_START, IM_END, VISION_START, VISION_END]
            + [res_token(k) for k in range(1, num_res + 1)]
            + [query_token(j) for j in range(1, parallel_num)])


def present_res_count(tokenizer: "PreTrainedTokenizerBase") -> int:
    """N where the vocabulary holds <|res_1|> .. <|res_N|> (0 without <|res_1|>)."""
    vocab = tokenizer.get_vocab()
    n = 0
    while res_token(n + 1) in vocab:
        n += 1
    return n


def missing_tokens(tokenizer: "PreTrainedTokenizerBase", tokens: Sequence[str]) -> list[str]:
    vocab = tokenizer.get_vocab()
    return [t for t in tokens if t not in vocab]


def query_tokens_held(tokenizer: "PreTrainedTokenizerBase") -> int:
    """The P whose query tokens `tokenizer` holds: <|query_1|> .. <|query_{P-1}|> present,
    <|query_P|> not (1 for a tokenizer without them)."""
    vocab = tokenizer.get_vocab()
    p = 1
    while query_token(p) in vocab:
        p += 1
    return p


def add_special_tokens(
    tokenizer: "PreTrainedTokenizerBase", parallel_num: int, num_res: int | None = None
) -> SpecialTokens:
    """Add the chat/vision tokens (when missing), res tokens and P-1 query tokens, in that order.

    Idempotent: tokens already in the vocabulary (e.g. a released BitDance tokenizer) keep their ids.
    ``num_res`` None: the res tokens the tokenizer already holds (a 32x release has 128, not 256:
    adding more would grow the vocabulary past the released embedding), else DEFAULT_NUM_RES.
    The caller resizes the LM's embeddings to ``SpecialTokens.vocab_size``.
    """
    if num_res is None:
        num_res = present_res_count(tokenizer) or DEFAULT_NUM_RES
    wanted = bitdance_tokens(parallel_num, num_res)
    missing = missing_tokens(tokenizer, wanted)
    if missing:
        # Registered as special tokens so they are never split and decode can skip them.
        tokenizer.add_special_tokens({"additional_special_tokens": missing},
                                     replace_extra_special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(wanted)
    return SpecialTokens(
        im_start=ids[0],
        im_end=ids[1],
        vision_start=ids[2],
        vision_end=ids[3],
        res_ids=tuple(ids[4 : 4 + num_res]),
        query_ids=tuple(ids[4 + num_res :]),
        vocab_size=len(tokenizer),
    )


def load_text_tokenizer(path: str) -> "PreTrainedTokenizerBase":
    """The tokenizer stored beside an LLM (local dir or hub id), SentencePiece-based ones included.

    transformers 5 traps: constructing ``LlamaTokenizer(vocab_file=...)`` silently yields empty ids
    (environment.md), so a directory holding ``tokenizer.model`` goes through ``from_pretrained``;
    and AutoTokenizer replaces a declared generic ``TokenizersBackend`` by the model type's class
    for some types (qwen2 -> Qwen2Tokenizer, which mis-reads a SentencePiece tokenizer.json), so a
    local directory declaring ``TokenizersBackend`` is loaded with exactly that class.
    """
    from transformers import AutoTokenizer, TokenizersBackend

    tok_cfg = os.path.join(path, "tokenizer_config.json")
    try:
        tokenizer = None
        if os.path.isfile(tok_cfg):
            with open(tok_cfg) as f:
                declared = json.load(f)
            if not isinstance(declared, dict):
                raise ValueError(f"{tok_cfg} holds no JSON object")
            if declared.get("tokenizer_class") == "TokenizersBackend":
                tokenizer = TokenizersBackend.from_pretrained(path)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - a tokenizer.json of another shape: KeyError & co
        why = " ".join(str(e).split())  # transformers' messages span lines; errors print one
        raise OSError(f"cannot load a text tokenizer from {path!r}: {type(e).__name__}: {why}"
                      ) from e
    # Without its vocabulary files transformers builds an empty tokenizer (every text -> no ids).
    if not encode(tokenizer, "a photo"):
        raise OSError(f"text tokenizer at {path!r} encodes text to no tokens: its vocabulary file "
                      f"(tokenizer.json, tokenizer.model or vocab.json + merges.txt) is missing "
                      f"or empty")
    return tokenizer


def train_sentencepiece(captions: Sequence[str], vocab_size: int = 384) -> bytes:
    """Serialized SentencePiece BPE model trained on ``captions`` (tiny corpora welcome).

    Identity normalisation and no dummy prefix keep "\\n" and spacing verbatim (the chat template
    relies on "\\n"); byte fallback means no caption ever maps to <unk>; ``hard_vocab_limit=False``
    lets a small corpus end below ``vocab_size`` (which must exceed 256 bytes + alphabet).
    """
    import sentencepiece as spm

    if not captions:
        raise ValueError("train_sentencepiece needs at least one caption")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(captions),
            model_writer=buf,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n", "user", "assistant"],  # the chat-template words, whole
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 260 vs 272"
        raise ValueError(f"vocab_size {vocab_size}: the caption tokenizer cannot be trained with "
                         f"it ({e}; byte fallback needs a piece per byte and per character)"
                         ) from None
    return buf.getvalue()


def make_text_tokenizer(out_dir: str, captions: Sequence[str], vocab_size: int = 384) -> "PreTrainedTokenizerBase":
    """Train a SentencePiece model on ``captions`` and save it as a HF tokenizer directory.

    The directory holds ``tokenizer.model`` (the SentencePiece file) plus what ``save_pretrained``
    writes (tokenizer.json with the chat tokens as special tokens and a Qwen-style chat template).
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(train_sentencepiece(captions, vocab_size))
    tokenizer = load_text_tokenizer(out_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return load_text_tokenizer(out_dir)
