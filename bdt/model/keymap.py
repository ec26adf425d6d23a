"""Our parameter names <-> BitDance `MLLModel` names (issue 4 part 8: checkpoint compatibility).

The mapping, by component (BitDance key -> ours; shapes are always equal):

    llm_model.<k>                      -> llm.<k>        the HF causal LM's own keys, unchanged
                                                         (model.embed_tokens, model.layers.N.*,
                                                         model.norm, lm_head)
    embed_vision_mlp.fc{1,2}.<w|b>     -> connector.fc{1,2}.<w|b>     (bdt.model.embed)
    vision_diffusion_head.net.<k>      -> head.<HEAD_KEY_MAP(k)>      (bdt.model.head: e.g.
                                          res_blocks.N.attn.wqkv -> blocks.N.qkv,
                                          ada_ln_blocks.J -> adaln_sets.J)
    vision_encoder.<k>                 -> not part of the AR model: the binary image tokenizer
                                          (VQModel) is a separate component in bdt, loaded from
                                          its own file (the release ships it as ae.safetensors);
                                          `state_dict_from_bitdance` drops these keys and
                                          `split_bitdance_state_dict` hands them back separately.

Non-persistent buffers on both sides (BitDance's pos_embed_1d, our 2D table and HF rotary
inv_freq) are not in any state dict. The released BitDance-14B is not one MLLModel file but
per-component files (see mllm_keys_14b.json "released_checkpoint_layout"); their keys are the
same keys without the component prefix, so prefixing them gives this mapping's input.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from bdt.model.head import HeadConfig, head_key_from_bitdance

if TYPE_CHECKING:
    from bdt.model.ar import BitDanceModel

BD_LLM, BD_CONNECTOR, BD_HEAD, BD_TOKENIZER = (
    "llm_model.", "embed_vision_mlp.", "vision_diffusion_head.net.", "vision_encoder.")
OURS_LLM, OURS_CONNECTOR, OURS_HEAD = "llm.", "connector.", "head."
# Names under which each component's BitDance key is looked up (prefix swap, else head map).
_PREFIX_SWAPS = ((BD_LLM, OURS_LLM), (BD_CONNECTOR, OURS_CONNECTOR))


def key_from_bitdance(key: str) -> str | None:
    """Our key for one `MLLModel` key; None for tokenizer keys; ValueError when unknown."""
    if key.startswith(BD_TOKENIZER):
        return None
    for theirs, ours in _PREFIX_SWAPS:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    if key.startswith(BD_HEAD):
        return OURS_HEAD + head_key_from_bitdance(key[len(BD_HEAD):])
    raise ValueError(f"BitDance key {key!r} belongs to no known component (expected a prefix "
                     f"among {BD_LLM}, {BD_CONNECTOR}, {BD_HEAD}, {BD_TOKENIZER})")


def split_bitdance_state_dict(state_dict: dict[str, Tensor]
                              ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(AR-model state dict in our names, image-tokenizer state dict in VQModel's own names)."""
    ours, tokenizer = {}, {}
    for key, value in state_dict.items():
        mapped = key_from_bitdance(key)
        if mapped is None:
            tokenizer[key[len(BD_TOKENIZER):]] = value
        else:
            ours[mapped] = value
    return ours, tokenizer


def state_dict_from_bitdance(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """An `MLLModel` state dict renamed for `BitDanceModel.load_state_dict`."""
    return split_bitdance_state_dict(state_dict)[0]


def bitdance_head_keys(cfg: HeadConfig) -> list[str]:
    """Every key (without `net.`) of a released `DiffHead` with this head's shape."""
    wb = ("weight", "bias")
    keys = [f"{m}.{p}" for m in ("time_embed.mlp.0", "time_embed.mlp.2", "cond_embed",
                                  "input_proj") for p in wb]
    for i in range(cfg.depth):
        keys += [f"res_blocks.{i}.{m}.{p}" for m in ("norm1", "attn.wqkv", "attn.wo", "norm2",
                                                       "w1", "w2") for p in wb]
    keys += [f"ada_ln_blocks.{j}.{p}" for j in range(cfg.num_adaln_sets) for p in wb]
    keys += [f"final_layer.{m}.{p}" for m in ("ada_ln_modulation", "linear") for p in wb]
    return keys


def bitdance_key_map(model: BitDanceModel) -> dict[str, str]:
    """BitDance key -> our key for every entry of `model.state_dict()` (one-to-one)."""
    mapping = {}
    for key in model.state_dict():
        for theirs, ours in _PREFIX_SWAPS:
            if key.startswith(ours):
                mapping[theirs + key[len(ours):]] = key
    for key in bitdance_head_keys(model.head.cfg):
        mapping[BD_HEAD + key] = OURS_HEAD + head_key_from_bitdance(key)
    return mapping


def state_dict_to_bitdance(model: BitDanceModel) -> dict[str, Tensor]:
    """`model.state_dict()` in BitDance `MLLModel` names (without the tokenizer's keys)."""
    ours = model.state_dict()
    return {theirs: ours[key] for theirs, key in bitdance_key_map(model).items()}


def compare_with_reference(model: BitDanceModel,
                           reference_shapes: dict[str, list[int]]) -> list[str]:
    """Problems (empty = compatible) between our state dict and a BitDance key -> shape table.

    Checks that every non-tokenizer reference key maps to one of our keys with an equal shape,
    that no two reference keys map to the same key, and that none of ours is left unmapped.
    """
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    problems, seen = [], {}
    for theirs, shape in reference_shapes.items():
        try:
            key = key_from_bitdance(theirs)
        except ValueError as e:
            problems.append(str(e))
            continue
        if key is None:
            continue
        if key in seen:
            problems.append(f"{theirs} and {seen[key]} both map to {key}")
        seen[key] = theirs
        if key not in ours:
            problems.append(f"{theirs} -> {key}: no such parameter in our model")
        elif ours[key] != list(shape):
            problems.append(f"{theirs} -> {key}: shape {list(shape)} vs ours {ours[key]}")
    problems += [f"our {k} has no BitDance counterpart" for k in sorted(set(ours) - set(seen))]
    return problems



def meta_model_14b(parallel_num: int = 16) -> BitDanceModel:
    """Our model under the BitDance-14B configuration (Qwen3-14B + 6x5120 head, P = 16 or 64),
    on the meta device: shapes without memory. Vocab = 151669 Qwen3 tokens + 256 res tokens +
    P-1 query tokens (151940 at P = 16, 151988 at P = 64), as the release resizes it."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bdt.model.ar import BitDanceModel
    from bdt.model.config import ModelConfig

    llm_config = Qwen3Config(
        vocab_size=151669 + 256 + parallel_num - 1, hidden_size=5120, intermediate_size=17408,
        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=False)
    cfg = ModelConfig(head=HeadConfig(width=5120, depth=6, num_adaln_sets=2, bits=32),
                      parallel_num=parallel_num, attn_backend="sdpa")
    with torch.device("meta"):
        return BitDanceModel(cfg, Qwen3ForCausalLM(llm_config))
