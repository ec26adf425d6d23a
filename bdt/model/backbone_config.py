"""Where the LLM backbone comes from (`BackboneConfig`) and its Hugging Face config, read and
checked before any weight or tokenizer (`llm_config`): a path that is no model folder, overrides
that are no fields, sizes below 1, attention logit soft-capping and layers other than attention
are refused naming config.json and the field. `layer_rules` reads from the same config what each
layer type's attention adds to the block-causal mask (method §2), as the backbone's forward does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bdt.model.attention_masks import FULL, LayerRule
from bdt.weights import listing

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class BackboneConfig:
    """Where the LLM comes from and how it runs."""

    path: str = ""  # local dir or hub id: HF causal LM (config.json [+ weights]) and its tokenizer
    from_scratch: bool = False  # random init from path's config.json (weights, if any, unread)
    config_overrides: dict[str, Any] = field(default_factory=dict)  # HF config fields to change
    attn_implementation: str = "sdpa"  # sdpa | eager | flex_attention | flash_attention_2
    dtype: str = "float32"  # parameter dtype: float32 | bfloat16 | float16
    # (Activation checkpointing is ModelConfig.activation_checkpointing: decoder layers + head.)


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
    tokenizer: a bad value (wrong type, inconsistent sizes) is a one-line ValueError naming
    config.json and the field. Remote code (an ``auto_map``) is never run."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig

    check_source(cfg.path)
    where = os.path.join(cfg.path, "config.json") if os.path.isdir(cfg.path) else cfg.path
    overrides = _plain_dict(cfg.config_overrides)
    try:
        config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=False)
        # transformers' own criterion for an override it applies (a field or a property)
        unused = sorted(k for k in overrides if not hasattr(config, k))
        if overrides and not unused:
            raw, _ = PretrainedConfig.get_config_dict(cfg.path)
            config = type(config).from_dict(_with_overrides(type(config), raw, overrides))
    except OSError as e:
        raise OSError(f"cannot read the backbone config {where!r}: {e}") from e
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        why = " ".join(str(e).split())  # the validators' messages span lines
        raise ValueError(f"backbone config {where!r}{_overridden(cfg)} is invalid: {why}") from e
    if unused:  # they would reach the model's constructor: a TypeError traceback there
        raise ValueError(f"model.backbone.config_overrides: {unused} are not fields of "
                         f"{type(config).__name__} ({where})")
    check_llm_config(config, where, _overridden(cfg))
    return config


def _with_overrides(config_class, raw: dict, overrides: dict) -> dict:
    """The config file's fields with the overrides in place, to build the config from: fields
    derived at construction (Qwen's layer_types from num_hidden_layers, use_sliding_window and
    max_window_layers) then follow the overrides, and transformers' validators see the result.
    (transformers sets overrides after construction: use_sliding_window=false kept every
    sliding layer, num_hidden_layers=8 kept a list of 4 layer types.) A layer_types list equal
    to the one the other fields derive, as save_pretrained writes it, is derived again."""
    from huggingface_hub.errors import StrictDataclassError

    if "layer_types" in raw and "layer_types" not in overrides:
        rest = {k: v for k, v in raw.items() if k != "layer_types"}
        try:
            derived = config_class.from_dict(dict(rest)).layer_types
        except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError):
            derived = None
        if derived == raw["layer_types"]:
            raw = rest
    return {**raw, **overrides, **_rope_with_theta(raw, overrides)}


_ROPE_KEYS = ("rope_parameters", "rope_scaling")  # rope_scaling: transformers 4's name


def _rope_with_theta(raw: dict, overrides: dict) -> dict:
    """The RoPE overrides with the file's rope_theta where they give none: transformers 5 keeps
    rope_theta inside rope_parameters, so an override of rope_scaling alone (yarn, say) fell
    back to the class default (Qwen3's 1e6 became 10000). Per-layer-type parameters (Gemma 3)
    take their own layer type's; a flat override of those needs rope_theta if theirs differ."""
    file_rope = next((raw[k] for k in _ROPE_KEYS if isinstance(raw.get(k), dict)), {})
    nested = _per_layer_type(file_rope)

    def theta(key: str, layer: str | None):
        if not nested:
            return file_rope.get("rope_theta", raw.get("rope_theta"))
        if layer is not None:
            return file_rope.get(layer, {}).get("rope_theta")
        thetas = {v.get("rope_theta") for v in file_rope.values()} - {None}
        if len(thetas) > 1:
            raise ValueError(f"model.backbone.config_overrides.{key} gives no rope_theta, and "
                             f"the layer types' own differ ({sorted(thetas)}): give it")
        return next(iter(thetas), None)

    def filled(key: str, params: dict, layer: str | None) -> dict:
        found = theta(key, layer) if "rope_theta" not in params else None
        return params if found is None else {**params, "rope_theta": found}

    out = {}
    for key in _ROPE_KEYS:
        given = overrides.get(key)
        if isinstance(given, dict):
            out[key] = ({k: filled(key, v, k) for k, v in given.items()}
                        if _per_layer_type(given) else filled(key, given, None))
    return out


def _per_layer_type(rope: dict) -> bool:
    """Whether RoPE parameters are given per layer type ({"full_attention": {...}, ...})."""
    return bool(rope) and "rope_type" not in rope and all(isinstance(v, dict)
                                                          for v in rope.values())


def _refuse_length_dependent_rope(config, where: str, overridden: str) -> None:
    """ValueError for a RoPE type whose frequencies follow the longest position of the batch
    (transformers' dynamic_rope_update: dynamic NTK, longrope): every cached sampling step would
    rotate by other frequencies than full recomputation and training past
    original_max_position_embeddings, and a sample of a packed row by its neighbours' lengths."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return
    by_key = ({f"rope_parameters.{k}": v for k, v in rope.items()} if _per_layer_type(rope)
              else {"rope_parameters": rope})
    for key, params in by_key.items():
        kind = str(params.get("rope_type", params.get("type", "")))
        if "dynamic" in kind or kind == "longrope":
            raise ValueError(f"backbone config {where!r}{overridden}: {key}.rope_type={kind!r} "
                             f"changes the RoPE frequencies with the sequence length, so cached "
                             f"sampling would not compute what training did; use a static type "
                             f"(default, linear, yarn, llama3)")


def check_llm_config(config, where: str, overridden: str = "") -> None:
    """`llm_config`'s checks of a loaded HF config (also a BitDance release's, read by its
    importer): ValueError naming `where` (config.json), any `overridden` fields, and the field."""
    # transformers checks their types, not their signs: 0 heads or hidden_size -1 ended in a
    # ZeroDivisionError or RuntimeError traceback from inside the model's constructor.
    small = [f"{k}={getattr(config, k)}" for k in _SIZE_FIELDS
             if isinstance(getattr(config, k, None), int) and getattr(config, k) < 1]
    if small:
        raise ValueError(f"backbone config {where!r}{overridden} is invalid: "
                         f"{', '.join(small)}; sizes must be >= 1")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:  # flex/varlen/flash dropped it silently; sdpa fails when sampling
        raise ValueError(f"backbone config {where!r}: attn_logit_softcapping={softcap} (Gemma 2): "
                         f"no bdt attention backend caps attention logits; set "
                         f"model.backbone.config_overrides.attn_logit_softcapping=null to "
                         f"train without the cap")
    types, layers = getattr(config, "layer_types", None), getattr(config, "num_hidden_layers", None)
    if isinstance(types, (list, tuple)) and isinstance(layers, int) and len(types) != layers:
        # transformers validates this at construction only, not a config built otherwise
        raise ValueError(f"backbone config {where!r}{overridden}: layer_types lists {len(types)} "
                         f"layer types but num_hidden_layers is {layers}: one per layer")
    _refuse_stateful_layers(config, where)
    _refuse_length_dependent_rope(config, where, overridden)
    if getattr(config, "num_attention_heads", None) is None and \
            getattr(config, "text_config", None) is not None:
        raise ValueError(f"backbone config {where!r}: {type(config).__name__} is a multimodal "
                         f"model (its language model is under text_config): bdt needs a causal "
                         f"LM; save the language model alone (its config and weights) and "
                         f"point model.backbone.path there")
    if getattr(config, "num_attention_heads", None) is None:  # read above as all attention
        raise ValueError(f"backbone config {where!r}: {type(config).__name__} names no "
                         f"num_attention_heads: bdt needs a causal LM whose layers are all "
                         f"attention (RWKV and xLSTM are recurrent)")
    _config_rules(config, f" {where!r}{overridden}")  # before the weights: it reads none


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


def layer_kinds(config) -> list[str]:
    """The type of each decoder layer, as the backbone's forward picks its mask by it: the
    config's layer_types, else transformers' reading of its window or chunk size."""
    return list(getattr(config, "layer_types", None) or _layer_types(config))


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
    rules = _config_rules(model.config, "")
    if len(set(rules.values())) > 1 and not _takes_masks_by_layer_type(model):
        raise ValueError(f"backbone {type(model).__name__}: its layer types need different "
                         f"masks ({', '.join(f'{k}: {r}' for k, r in sorted(rules.items()))}) "
                         f"but its forward takes one attention mask for every layer: bdt "
                         f"cannot apply them")
    return rules


def _config_rules(config, where: str) -> dict[str, LayerRule]:
    """`layer_rules` as the config alone gives them; a bad window or chunk size is a ValueError
    naming `where` (the config file, from `llm_config`) and the field."""
    sizes = {"sliding_attention": ("window", "sliding_window"),
             "chunked_attention": ("chunk", "attention_chunk_size")}
    rules = {}
    for kind in layer_kinds(config):
        field, key = sizes.get(kind, (None, None))
        size = getattr(config, key, None) if key else None
        try:
            rules[kind] = LayerRule(**{field: size}) if size is not None else FULL
        except ValueError as e:
            raise ValueError(f"backbone config{where}: {key}={size!r} of its {kind} layers: "
                             f"{e}") from None
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

