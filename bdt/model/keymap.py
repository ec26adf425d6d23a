"""Our parameter names <-> BitDance `MLLModel` names (issue 4 part 8: checkpoint compatibility).

The mapping, by component (BitDance key -> ours; shapes are always equal):

    llm_model.<k>                      -> llm.<k>        the HF causal LM's own keys, unchanged
                                                         (model.embed_tokens, model.layers.N.*,
                                                         model.norm, lm_head)
    embed_vision_mlp.fc{1,2}.<w|b>     -> connector.fc{1,2}.<w|b>     (bdt.model.embed)
    vision_diffusion_head.net.<k>      -> head.<HEAD_KEY_MAP(k)>      (bdt.model.head: e.g.
                                          res_blocks.N.attn.wqkv -> blocks.N.qkv,
                                          res_blocks.N.{w1|mlp.0} -> blocks.N.mlp_in,
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
`model_config_from_bitdance` reads an MLLModel config (the training yaml's `model:` block).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from bdt import storage

from bdt.model.config import ModelConfig
from bdt.model.head import (MLP_KINDS, HeadConfig, head_config_from_bitdance,
                            head_key_from_bitdance)

if TYPE_CHECKING:
    from bdt.model.ar import BitDanceModel

# The released model folder (t2i pipeline): the LLM's HF files, and beside them these.
AE_CONFIG, AE_WEIGHTS = "ae_config.json", "ae.safetensors"
HEAD_CONFIG, HEAD_WEIGHTS = "vision_head_config.json", "vision_head.safetensors"
PROJECTOR_WEIGHTS = "projector.safetensors"
RELEASE_FILES = (AE_CONFIG, AE_WEIGHTS, HEAD_CONFIG, HEAD_WEIGHTS, PROJECTOR_WEIGHTS)
# A diffusers port of it (the pipeline's save_pretrained): the same tensors under the same keys,
# one folder per component, each with its config.json and diffusers' weights file name.
PORT_INDEX, PORT_WEIGHTS = "model_index.json", "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class ReleaseLayout:
    """Where a released model's parts lie, relative to its folder."""
    name: str
    llm_dirs: tuple[str, ...]  # their files together make the LLM's HF folder ("" = the root)
    ae_config: str
    ae_weights: str
    head_config: str
    head_weights: str
    projector_weights: str

    @property
    def components(self) -> tuple[str, ...]:
        return (self.ae_config, self.ae_weights, self.head_config, self.head_weights,
                self.projector_weights)

    @property
    def llm_config(self) -> str:
        return "/".join(p for p in (self.llm_dirs[0], "config.json") if p)


RELEASE = ReleaseLayout("a released BitDance model folder", ("",), *RELEASE_FILES)
DIFFUSERS_PORT = ReleaseLayout(
    "a diffusers port of a released BitDance model", ("text_encoder", "tokenizer"),
    "autoencoder/config.json", f"autoencoder/{PORT_WEIGHTS}", "diffusion_head/config.json",
    f"diffusion_head/{PORT_WEIGHTS}", f"projector/{PORT_WEIGHTS}")


def release_layout(path: str) -> ReleaseLayout | None:
    """Which layout the folder `path` (local or fsspec URL) has, by its head config; None if
    neither."""
    if storage.exists(storage.join(path, HEAD_CONFIG)):
        return RELEASE
    if storage.exists(storage.join(path, PORT_INDEX)) and \
            storage.exists(storage.join(path, DIFFUSERS_PORT.head_config)):
        return DIFFUSERS_PORT
    return None
BD_LLM, BD_CONNECTOR, BD_HEAD, BD_TOKENIZER = (
    "llm_model.", "embed_vision_mlp.", "vision_diffusion_head.net.", "vision_encoder.")
OURS_LLM, OURS_CONNECTOR, OURS_HEAD = "llm.", "connector.", "head."
# Names under which each component's BitDance key is looked up (prefix swap, else head map).
_PREFIX_SWAPS = ((BD_LLM, OURS_LLM), (BD_CONNECTOR, OURS_CONNECTOR))


def key_from_bitdance(key: str, head_mlp: str | None = None) -> str | None:
    """Our key for one `MLLModel` key; None for tokenizer keys; ValueError when unknown (or,
    given our head's `head_mlp` kind, a head MLP key of the other kind)."""
    if key.startswith(BD_TOKENIZER):
        return None
    for theirs, ours in _PREFIX_SWAPS:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    if key.startswith(BD_HEAD):
        return OURS_HEAD + head_key_from_bitdance(key[len(BD_HEAD):], head_mlp)
    raise ValueError(f"BitDance key {key!r} belongs to no known component (expected a prefix "
                     f"among {BD_LLM}, {BD_CONNECTOR}, {BD_HEAD}, {BD_TOKENIZER})")


def split_bitdance_state_dict(state_dict: dict[str, Tensor], head_mlp: str | None = None
                              ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(AR-model state dict in our names, image-tokenizer state dict in VQModel's own names)."""
    ours, tokenizer = {}, {}
    for key, value in state_dict.items():
        mapped = key_from_bitdance(key, head_mlp)
        if mapped is None:
            tokenizer[key[len(BD_TOKENIZER):]] = value
        else:
            ours[mapped] = value
    return ours, tokenizer


def state_dict_from_bitdance(state_dict: dict[str, Tensor], head_mlp: str | None = None
                             ) -> dict[str, Tensor]:
    """An `MLLModel` state dict renamed for `BitDanceModel.load_state_dict` (pass the model's
    `cfg.head.mlp` as `head_mlp` to have a checkpoint of the other MLP kind named as such)."""
    return split_bitdance_state_dict(state_dict, head_mlp)[0]


def bitdance_head_keys(cfg: HeadConfig) -> list[str]:
    """Every key (without `net.`) of a released `DiffHead` with this head's shape."""
    wb = ("weight", "bias")
    keys = [f"{m}.{p}" for m in ("time_embed.mlp.0", "time_embed.mlp.2", "cond_embed",
                                  "input_proj") for p in wb]
    block = ("norm1", "attn.wqkv", "attn.wo", "norm2", *MLP_KINDS[cfg.mlp])
    for i in range(cfg.depth):
        keys += [f"res_blocks.{i}.{m}.{p}" for m in block for p in wb]
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
            key = key_from_bitdance(theirs, model.head.cfg.mlp)
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


# MLLModel's defaults (modeling/mllm.py) for keys an MLLModel config leaves out.
_VISION_PRED_DEFAULTS = dict(model_dim=1024, num_blocks=3, num_adaln=1, time_shift=1.0,
                             time_schedule="logit_normal", P_mean=0.0, P_std=1.0,
                             parallel_num=1, diff_batch_mul=1, use_swiglu=False)


def model_config_from_bitdance(config: Mapping[str, Any], llm_hidden: int) -> ModelConfig:
    """Our model config for a released `MLLModel(config)` (the yaml's `model:` block) whose LLM
    has hidden size `llm_hidden`: head, P, 2D position table and exposure-bias rate."""
    head = config["head"]
    vp = {**_VISION_PRED_DEFAULTS, **head["vision_pred"]}
    if vp.get("type") != "diffusion_parallel_x":
        raise ValueError(f"BitDance config: head.vision_pred.type {vp.get('type')!r} is not "
                         "supported (bdt models the 'diffusion_parallel_x' head)")
    head_cfg = head_config_from_bitdance(dict(
        ch_target=config["encoder"]["params"]["ddconfig"]["z_channels"], ch_cond=llm_hidden,
        ch_latent=vp["model_dim"], depth_latent=vp["num_blocks"], depth_adanln=vp["num_adaln"],
        time_shift=vp["time_shift"], time_schedule=vp["time_schedule"], P_mean=vp["P_mean"],
        P_std=vp["P_std"], parallel_num=vp["parallel_num"], diff_batch_mul=vp["diff_batch_mul"],
        use_swiglu=vp["use_swiglu"]))
    cfg = ModelConfig(head=head_cfg, parallel_num=int(vp["parallel_num"]),
                      pos_max_len=int(head.get("pe_max_len", 4096)) // int(config["vit_patch_size"]),
                      flip_prob=float(head.get("vision_perturb", 0.0)))
    cfg.validate()
    return cfg


def meta_model_from_bitdance(config: Mapping[str, Any], qwen3_config: Mapping[str, Any]
                             ) -> BitDanceModel:
    """Our model for a released `MLLModel(config)` with this Qwen3 config (vocab_size = the
    resized vocabulary, as in a released model folder), on the meta device: shapes without
    memory, e.g. BitDance-14B (tests/fixtures/bitdance/mllm_keys_14b.json)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bdt.model.ar import BitDanceModel

    cfg = model_config_from_bitdance(config, int(qwen3_config["hidden_size"]))
    cfg.attn_backend = "sdpa"
    with torch.device("meta"):
        return BitDanceModel(cfg, Qwen3ForCausalLM(Qwen3Config(**qwen3_config)))
