"""The LLM backbone: any Hugging Face causal LM (Qwen3 default; Qwen2, Llama, ...) plus its text
tokenizer, extended with BitDance's special tokens (method §2), and the tiny LLM of the embedded
default (system §4).

A real checkpoint and the tiny default take the same path: a directory (or hub id) holding
``config.json`` + weights + tokenizer files, read with ``from_pretrained``; the config is read and
checked first (`bdt.model.backbone_config`).

Checkpoint key mapping: BitDance ``MLLModel`` keys ``llm_model.<k>`` are the HF causal LM's own
state-dict keys ``<k>`` (model.embed_tokens.weight, model.layers.N..., model.norm.weight,
lm_head.weight); see `backbone_key_map`. Vocab rows must equal ``len(tokenizer)`` after the
additions (16x: 151940, 64x: 151988), which `load_backbone` guarantees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pickle import UnpicklingError
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from bdt.model.backbone_config import (
    BackboneConfig,
    _overridden,
    _torch_dtype,
    llm_config,
)
from bdt.model.text_tokenizer import (
    IM_END,
    PromptIds,
    SpecialTokens,
    add_special_tokens,
    load_text_tokenizer,
    make_text_tokenizer,
    prompt_ids,
)
from bdt.weights import INDEX_SUFFIX, listing, safetensors_files

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BITDANCE_LLM_PREFIX = "llm_model."


@dataclass
class Backbone:
    """What `load_backbone` returns: the resized LM and the matching text side."""

    model: "PreTrainedModel"  # AutoModelForCausalLM with embed_tokens/lm_head of special.vocab_size rows
    tokenizer: "PreTrainedTokenizerBase"
    special: SpecialTokens
    prompt: PromptIds


def load_causal_lm(cfg: BackboneConfig, weights: Mapping[str, torch.Tensor] | None = None,
                   vocab_size: int | None = None) -> "PreTrainedModel":
    """The causal LM named by ``cfg``: pretrained weights, or a random init from its config; given
    ``weights`` (its state dict, e.g. from a training checkpoint), built from its config with
    ``vocab_size`` rows and loaded with them, its pretrained weights never read."""
    from transformers import AutoModelForCausalLM

    hf_config = llm_config(cfg)
    dtype = _torch_dtype(cfg.dtype)
    kwargs = dict(attn_implementation=cfg.attn_implementation, dtype=dtype)
    try:
        if weights is not None or cfg.from_scratch:
            model = (_causal_lm_with(weights, hf_config, vocab_size, kwargs) if weights is not None
                     else AutoModelForCausalLM.from_config(hf_config, **kwargs))
        else:
            _check_shard_names(cfg.path)
            # Mismatched shapes are reported, not raised, so that the error can name them. The
            # config checked above, not the overrides: transformers would apply them its way.
            model, info = AutoModelForCausalLM.from_pretrained(
                cfg.path, config=hf_config, output_loading_info=True,
                ignore_mismatched_sizes=True, trust_remote_code=False, **kwargs)
            _refuse_incomplete_weights(info)
        if not cfg.from_scratch:
            _refuse_nonfinite(model)
    except (SafetensorError, UnpicklingError) as e:  # a corrupt file, or a pickle with code
        raise ValueError(f"cannot build the backbone from {cfg.path!r}: {e}") from e
    except (OSError, ValueError, ImportError) as e:
        raise type(e)(f"cannot build the backbone from {cfg.path!r}: {e}") from e
    except (RuntimeError, ArithmeticError, LookupError) as e:  # raised by the model's constructor
        # on config values transformers lets through (an unknown hidden_act, layer_types shorter
        # than num_hidden_layers, sizes beyond memory): one line naming the config, no traceback.
        raise ValueError(f"cannot build the backbone from the config of {cfg.path!r}"
                         f"{_overridden(cfg)}: {type(e).__name__}: {e}") from e
    return model


# The weights transformers loads from a model folder: the first of these present, or its index.
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _check_shard_names(path: str) -> None:
    """ValueError when the index transformers would read names a shard outside the folder
    (`../x`, an absolute path): it joins them to the folder as they are and loads what they name.
    A hub id is resolved by huggingface_hub inside its snapshot."""
    if not os.path.isdir(path):
        return
    for name in _HF_WEIGHTS:
        if os.path.isfile(os.path.join(path, name)):
            return
        if os.path.isfile(os.path.join(path, name + INDEX_SUFFIX)):
            safetensors_files(os.path.join(path, name + INDEX_SUFFIX))  # bdt.weights' rules
            return


def _causal_lm_with(weights: Mapping[str, torch.Tensor], hf_config, vocab_size: int | None,
                    kwargs: dict) -> "PreTrainedModel":
    """transformers builds the model without initialising it (meta device) and loads `weights`
    into it, as from a checkpoint folder: non-persistent buffers (rotary tables) are computed."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if vocab_size is not None:
        hf_config.vocab_size = vocab_size
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(hf_config), None)
    if model_class is None:
        raise ValueError(f"{type(hf_config).__name__} is not a causal-LM config")
    model, info = model_class.from_pretrained(
        None, config=hf_config, state_dict=dict(weights), output_loading_info=True,
        ignore_mismatched_sizes=True, **kwargs)
    _refuse_incomplete_weights(info)
    return model


def _refuse_incomplete_weights(info: dict) -> None:
    """transformers initialises the parameters that a checkpoint lacks or has in another shape at
    random, and drops the weights its config has no place for (layers past num_hidden_layers),
    and only warns: the model would compute garbage. (An absent tied weight is tied; keys the
    model class declares harmless never reach `unexpected_keys`.)"""
    missing = sorted(info["missing_keys"])
    shapes = sorted(f"{k}: expected {list(model)} got {list(ckpt)}"
                    for k, ckpt, model in info["mismatched_keys"])
    unexpected = sorted(info["unexpected_keys"])
    parts = [f"{len(items)} {what} {listing(items)}" for what, items in (
        ("missing parameter(s)", missing), ("shape mismatch(es)", shapes),
        ("unknown key(s)", unexpected)) if items]
    if parts:
        raise ValueError("its weights do not fit its config: " + "; ".join(parts))


def _refuse_nonfinite(model: "PreTrainedModel") -> None:
    """NaN/inf weights would train on garbage without an error; the check costs one pass over
    weights just read. A parameter partitioned at load (ZeRO-3) is empty here: each rank checks
    the part it holds (`ds_tensor`) and the ranks pool what they found, so all of them refuse."""
    tensors = {**dict(model.named_buffers()), **{
        name: getattr(p, "ds_tensor", p) for name, p in model.named_parameters()}}
    bad = sorted(name for name, t in tensors.items()
                 if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    partitioned = any(hasattr(p, "ds_tensor") for p in model.parameters())
    if partitioned and torch.distributed.is_initialized():
        found: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(found, bad)
        bad = sorted(set().union(*found))
    if bad:
        raise ValueError(f"its weights hold NaN or inf values in {len(bad)} tensor(s) {listing(bad)}")


def _rows(weight: torch.Tensor) -> int:
    """Row count of an embedding weight; a ZeRO-3 partitioned one reports its full shape in
    ds_shape (its local `shape` is empty)."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def _editable(weight: torch.Tensor):
    """Context in which `weight` holds its full value and rank 0's edits persist: a no-op for an
    ordinary tensor; for a ZeRO-3 partitioned one (it has a ds_id) a gather whose result rank 0
    writes back to every partition."""
    if not hasattr(weight, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed  # only reachable when DeepSpeed built the parameter

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=0)


@torch.no_grad()
def resize_embeddings(model: "PreTrainedModel", num_rows: int) -> None:
    """Resize embed_tokens and lm_head to ``num_rows``; rows beyond the old size get the mean of
    the old rows (BitDance's mean resizing, without HF's random jitter).

    Rows may also shrink (Qwen3 pads to 151936 rows but BitDance at P=4 uses 151928), so the
    shapes always equal ``len(tokenizer)`` like the released checkpoints. Works on a model
    partitioned at load by ZeRO-3 too.
    """
    old = _rows(model.get_input_embeddings().weight)
    model.resize_token_embeddings(num_rows, mean_resizing=False)
    if num_rows <= old:
        return
    for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
        if emb is not None:
            with _editable(emb.weight):
                # fp32 mean: the weights may already be bf16 (ZeRO-3 casts while loading)
                emb.weight[old:] = emb.weight[:old].float().mean(dim=0)


def load_backbone(cfg: BackboneConfig, parallel_num: int, num_res: int | None = None,
                  weights: Mapping[str, torch.Tensor] | None = None,
                  tokenizer: "PreTrainedTokenizerBase | None" = None) -> Backbone:
    """LM + tokenizer from ``cfg.path``, with BitDance's tokens added and embeddings resized;
    ``num_res``: see `add_special_tokens` (None: the res tokens the tokenizer holds, else 256);
    ``weights``: the resized LM's state dict, loaded instead of the pretrained weights (only the
    config and tokenizer are read from ``cfg.path``); ``tokenizer``: the text tokenizer at
    ``cfg.path`` as the caller already loaded it (it takes BitDance's tokens), not read again."""
    hf_config = llm_config(cfg)
    tokenizer = tokenizer if tokenizer is not None else load_text_tokenizer(cfg.path)
    rows = getattr(hf_config, "vocab_size", None)
    if weights is None and not cfg.from_scratch and rows is not None and rows < len(tokenizer):
        # Resizing would give the tokenizer's surplus text tokens untrained (mean) embeddings.
        raise ValueError(f"backbone {cfg.path!r}: its tokenizer has {len(tokenizer)} tokens but "
                         f"config.json vocab_size is {rows} (embedding rows): "
                         f"the tokenizer does not belong to these weights")
    special = add_special_tokens(tokenizer, parallel_num, num_res)
    model = load_causal_lm(cfg, weights, special.vocab_size)
    resize_embeddings(model, special.vocab_size)
    return Backbone(model=model, tokenizer=tokenizer, special=special, prompt=prompt_ids(tokenizer))


def output_logits(config, lm_head_out: torch.Tensor) -> torch.Tensor:
    """fp32 logits as the backbone's own causal-LM forward makes them from its LM head's output
    (its config says how): Cohere multiplies by logit_scale, Granite and MiniCPM3 divide by
    logits_scaling (HyperCLOVA X multiplies), Gemma 2/3 soft-cap with tanh at
    final_logit_softcapping. The plain LM head output is not what the pretrained LM predicts."""
    logits = lm_head_out.float()
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        logits = logits * scaling if config.model_type == "hyperclovax" else logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def decoder_matmul_params(model: "PreTrainedModel") -> float:
    """Weights the decoder multiplies each token by (its forward matmul FLOPs per token / 2),
    counted on the built modules as the architecture has them: every Linear (GPT-2's Conv1D) of
    the decoder: q, k, v, o however fused, a multi-query Falcon's one key/value head, a gated
    MLP's 3 matrices or a plain one's 2; of stacked MoE experts ([E, out, in]) the
    num_experts_per_tok a token is routed to (not the router: E x hidden). Embeddings and the LM
    head are not counted; a ZeRO-3 partitioned parameter counts in full."""
    from transformers.pytorch_utils import Conv1D

    top_k = getattr(model.config, "num_experts_per_tok", None)
    total = 0.0
    for module in model.get_decoder().modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            total += int(getattr(module.weight, "ds_numel", module.weight.numel()))
            continue
        for p in module.parameters(recurse=False):
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if len(shape) == 3:  # experts stacked on dim 0: a token runs top_k of them
                total += shape[1] * shape[2] * (top_k or shape[0])  # (all: no top-k named)
    return total


def backbone_key_map(model: "PreTrainedModel", prefix: str = "") -> dict[str, str]:
    """BitDance key -> our key for every backbone parameter (ours mounted under ``prefix``)."""
    return {BITDANCE_LLM_PREFIX + k: prefix + k for k in model.state_dict()}


_TINY_ARCHS = ("qwen3", "qwen2", "llama")


def make_tiny_llm(
    out_dir: str,
    captions: Sequence[str],
    arch: str = "qwen3",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 384,
    max_position_embeddings: int = 8192,
    seed: int = 0,
) -> str:
    """Create the embedded default's "pretrained" LLM in ``out_dir`` and return ``out_dir``.

    A SentencePiece tokenizer trained on ``captions`` (HF directory, chat tokens, chat template)
    and a randomly initialised small causal LM of family ``arch``, both ``save_pretrained`` into
    one directory, so `load_backbone` reads it exactly like a downloaded checkpoint. BitDance's
    own tokens are not added here: like a real base LLM, the directory holds a plain model.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    if arch not in _TINY_ARCHS:
        raise ValueError(f"make_tiny_llm arch {arch!r} is not one of {_TINY_ARCHS}")
    tokenizer = make_text_tokenizer(out_dir, captions, vocab_size)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
    )
    if arch == "qwen3":
        config = Qwen3Config(head_dim=hidden // heads, **common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = LlamaConfig(**common)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.save_pretrained(out_dir)
    return out_dir
