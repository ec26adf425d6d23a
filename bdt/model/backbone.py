"""The LLM backbone: any Hugging Face causal LM (Qwen3 default; Qwen2, Llama, ...) plus its text
tokenizer, extended with BitDance's special tokens (method §2), and the tiny LLM of the embedded
default (system §4).

A real checkpoint and the tiny default take the same path: a directory (or hub id) holding
``config.json`` + weights + tokenizer files, read with ``from_pretrained``.

Checkpoint key mapping: BitDance ``MLLModel`` keys ``llm_model.<k>`` are the HF causal LM's own
state-dict keys ``<k>`` (model.embed_tokens.weight, model.layers.N..., model.norm.weight,
lm_head.weight); see `backbone_key_map`. Vocab rows must equal ``len(tokenizer)`` after the
additions (16x: 151940, 64x: 151988), which `load_backbone` guarantees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pickle import UnpicklingError
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from bdt.model.attention_masks import FULL, LayerRule
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
class BackboneConfig:
    """Where the LLM comes from and how it runs."""

    path: str = ""  # local dir or hub id: HF causal LM (config.json [+ weights]) and its tokenizer
    from_scratch: bool = False  # random init from path's config.json (weights, if any, unread)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields to change
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention | flash_attention_2
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float16
    # (Activation checkpointing is ModelConfig.activation_checkpointing: decoder layers + head.)


@dataclass
class Backbone:
    """What `load_backbone` returns: the resized LM and the matching text side."""

    model: "PreTrainedModel"  # AutoModelForCausalLM with embed_tokens/lm_head of special.vocab_size rows
    tokenizer: "PreTrainedTokenizerBase"
    special: SpecialTokens
    prompt: PromptIds


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"backbone dtype {name!r} is not a torch floating dtype (float32, bfloat16, ...)")
    return dtype


def _plain_dict(d: Any) -> dict[str, Any]:
    """``config_overrides`` as a plain dict (it may arrive as a read-only omegaconf DictConfig)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(d, resolve=True) if isinstance(d, DictConfig) else dict(d)


def check_source(path: str) -> None:
    """OSError (ValueError when empty) unless `path` is a model folder with a config.json or
    can be a hub id."""
    if not path:
        raise ValueError("backbone path is empty: give a local model directory or a hub id")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise OSError(f"backbone path {path!r} has no config.json (not a Hugging Face model directory)")
    elif os.path.isabs(path) or path.startswith("."):
        raise OSError(f"backbone path {path!r} does not exist")
    # Anything else is a hub id, resolved by from_pretrained (offline: only from the HF cache).


def llm_config(cfg: BackboneConfig):
    """The HF config at ``cfg.path`` with ``config_overrides`` applied, read before any weight or
    tokenizer: a bad value (wrong type, inconsistent sizes) is a ValueError naming config.json and
    the field. Remote code (an ``auto_map``) is never run."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    check_source(cfg.path)
    where = os.path.join(cfg.path, "config.json") if os.path.isdir(cfg.path) else cfg.path
    try:
        config, unused = AutoConfig.from_pretrained(cfg.path, trust_remote_code=False,
                                                    return_unused_kwargs=True,
                                                    **_plain_dict(cfg.config_overrides))
    except OSError as e:
        raise OSError(f"cannot read the backbone config {where!r}: {e}") from e
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"backbone config {where!r} is invalid: {e}") from e
    if unused:  # they would reach the model's constructor: a TypeError traceback there
        raise ValueError(f"model.backbone.config_overrides: {sorted(unused)} are not fields of "
                         f"{type(config).__name__} ({where})")
    # transformers checks their types, not their signs: 0 heads or hidden_size -1 ended in a
    # ZeroDivisionError or RuntimeError traceback from inside the model's constructor.
    small = [f"{k}={getattr(config, k)}" for k in _SIZE_FIELDS
             if isinstance(getattr(config, k, None), int) and getattr(config, k) < 1]
    if small:
        raise ValueError(f"backbone config {where!r}{_overridden(cfg)} is invalid: "
                         f"{', '.join(small)}; sizes must be >= 1")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:  # flex/varlen/flash dropped it silently; sdpa fails when sampling
        raise ValueError(f"backbone config {where!r}: attn_logit_softcapping={softcap} (Gemma 2): "
                         f"no bdt attention backend caps attention logits; set "
                         f"model.backbone.config_overrides.attn_logit_softcapping=null to "
                         f"train without the cap")
    _refuse_stateful_layers(config, where)
    if getattr(config, "num_attention_heads", None) is None:  # read above as all attention
        raise ValueError(f"backbone config {where!r}: {type(config).__name__} names no "
                         f"num_attention_heads: bdt needs a causal LM whose layers are all "
                         f"attention (RWKV and xLSTM are recurrent)")
    return config


# Layer types bdt's masks govern (a window or chunk narrows the block-causal mask: `layer_rules`),
# MLP- or MoE-only layers (no mixing across tokens), and transformers' "dummy" for those and for
# a layer reusing another layer's keys and values.
_MASKED_LAYERS = ("full_attention", "sliding_attention", "chunked_attention", "moe", "mlp", "dummy")


def _layer_types(config) -> list[str]:
    """transformers' reading of every architecture's layer kinds (not a public API): the
    config's layer_types, else what its sliding_window / attention_chunk_size imply."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        return get_layer_types_and_kwargs(config)[0]
    except (ImportError, AttributeError, TypeError):
        return list(getattr(config, "layer_types", None) or [])


def _refuse_stateful_layers(config, where: str) -> None:
    """ValueError for a backbone with layers other than attention (Mamba, Jamba, LFM2,
    Qwen3-Next): a recurrent or convolution layer carries state from one sample of a packed row
    into the next and sees no patch whole, and no mask can stop it."""
    types = _layer_types(config)
    other = sorted({t for t in types if t not in _MASKED_LAYERS})
    if other:
        layers = [str(i) for i, t in enumerate(types) if t not in _MASKED_LAYERS]
        raise ValueError(f"backbone config {where!r}: {type(config).__name__} has {other} "
                         f"layers ({listing(layers)}): bdt's block-causal masks govern "
                         f"attention layers only; use a backbone whose layers are all attention")


def layer_rules(model: "PreTrainedModel") -> dict[str, LayerRule]:
    """Layer type -> what its attention adds to the block-causal mask (`LayerRule`), as the
    backbone's own forward builds its masks from the config: `sliding_attention` a window of
    sliding_window keys (Mistral, Gemma 3, Qwen2/3 with use_sliding_window), `chunked_attention`
    chunks of attention_chunk_size (Llama 4), other types nothing. Types are the forward's own
    keys (config.layer_types) when it has them. ValueError when the layers need different masks
    and the backbone's forward takes one mask for all of them."""
    config = model.config
    sizes = {"sliding_attention": ("window", "sliding_window"),
             "chunked_attention": ("chunk", "attention_chunk_size")}
    rules = {}
    for kind in getattr(config, "layer_types", None) or _layer_types(config):
        field, key = sizes.get(kind, (None, None))
        size = getattr(config, key, None) if key else None
        try:
            rules[kind] = LayerRule(**{field: size}) if size is not None else FULL
        except ValueError as e:
            raise ValueError(f"backbone config: {key}={size!r} of its {kind} layers: {e}") from None
    if len(set(rules.values())) > 1 and not _takes_masks_by_layer_type(model):
        raise ValueError(f"backbone {type(model).__name__}: its layer types need different "
                         f"masks ({', '.join(f'{k}: {r}' for k, r in sorted(rules.items()))}) "
                         f"but its forward takes one attention mask for every layer: bdt "
                         f"cannot apply them")
    return rules


def _takes_masks_by_layer_type(model: "PreTrainedModel") -> bool:
    """Whether the model building the masks (the decoder, maybe inside a wrapper) takes a dict
    of masks by layer type: transformers has no flag for it; those that do test
    `isinstance(attention_mask, dict)` in their forward."""
    import inspect

    from transformers import PreTrainedModel

    for module in model.modules():
        try:
            if isinstance(module, PreTrainedModel) and \
                    "attention_mask, dict)" in inspect.getsource(type(module).forward):
                return True
        except (OSError, TypeError):  # no source to read: taken as one mask
            continue
    return False


_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim")


def _overridden(cfg: BackboneConfig) -> str:
    overrides = _plain_dict(cfg.config_overrides)
    return f" (overridden by model.backbone.config_overrides {overrides})" if overrides else ""


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
            # Mismatched shapes are reported, not raised, so that the error can name them.
            model, info = AutoModelForCausalLM.from_pretrained(
                cfg.path, output_loading_info=True, ignore_mismatched_sizes=True,
                trust_remote_code=False, **kwargs, **_plain_dict(cfg.config_overrides))
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
                  weights: Mapping[str, torch.Tensor] | None = None) -> Backbone:
    """LM + tokenizer from ``cfg.path``, with BitDance's tokens added and embeddings resized;
    ``num_res``: see `add_special_tokens` (None: the res tokens the tokenizer holds, else 256);
    ``weights``: the resized LM's state dict, loaded instead of the pretrained weights (only the
    config and tokenizer are read from ``cfg.path``)."""
    hf_config = llm_config(cfg)
    tokenizer = load_text_tokenizer(cfg.path)
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
