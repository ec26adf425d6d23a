"""The BitDance AR model (method §2-4): an HF causal LM + bits connector + 2D pos-emb + head.

Training forward on a `PackedSequence` (one packed row of S samples):
    inputs_embeds = embed_tokens(ids) at text positions,
                    connector(flipped bits) + pos2d(row, col) at image positions     (method §2)
    hidden        = LLM decoder under the block-causal, document-separated mask      (method §4)
    text CE       = LM head on the text-target positions only (a full [L, V] logits tensor
                    would be 151940 x L floats for Qwen3), scaled or soft-capped as the
                    backbone's own forward does it, weight 0.01
    head cond     = hidden at the predicting position + pos2d of the predicted token (method §3)
    vision loss   = flow loss per token, mean, weight 1.0

Parameter names: `llm.*` (the HF model's own keys), `connector.*`, `head.*`; see
`bdt.model.keymap` for the mapping to BitDance's `MLLModel`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdt.model.attention import (
    attention_kwargs,
    by_layer_type,
    check_rules,
    flex_row_len,
    resolve_backend,
)
from bdt.model.attention_kernels import hf_attn_implementation
from bdt.model.attention_masks import BlockCausalLayout, decode_attention_mask, per_document_rows
from bdt.model.backbone import decoder_matmul_params, output_logits
from bdt.model.backbone_config import layer_kinds, layer_rules
from bdt.model.config import ModelConfig
from bdt.model.embed import BitsConnector, PosEmbed2D, flip_bits
from bdt.model.flow import binarize, flow_loss
from bdt.model import llm_config_record
from bdt.model.head import DiffusionHead
from bdt.model.kv_cache import keys_kept, kv_cache
from bdt.model.sequence import PackedSequence
from bdt.weights import read_safetensors, state_dict_problems

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from bdt.model.text_tokenizer import PromptIds, SpecialTokens

LLM_DIR = "llm"  # HF model + tokenizer directory inside a saved BitDanceModel
WEIGHTS_NAME = "bitdance_extra.safetensors"  # connector + head (the LLM's weights live in LLM_DIR)
CONFIG_NAME = "model_config.yaml"


class BitDanceModel(nn.Module):
    """Backbone LLM + bits connector + 2D position embedding + diffusion head.

    `special`/`prompt`/`tokenizer` (from `bdt.model.backbone.load_backbone`) are the text side the
    sampler needs; a model built for key checks or from token ids alone may leave them None.
    `extra_on_meta`: build the connector and head on the meta device, for a caller that loads
    their weights next (`load_extra`): initialising BitDance-14B's 1.76B-parameter head only to
    overwrite it takes ~7 GB and 44 s of CPU.
    """

    def __init__(self, cfg: ModelConfig, llm: PreTrainedModel,
                 special: SpecialTokens | None = None, prompt: PromptIds | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, extra_on_meta: bool = False):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.llm = llm
        self.special, self.prompt, self.tokenizer = special, prompt, tokenizer
        hidden = llm.config.hidden_size
        head_cfg = replace(cfg.head, tokens=cfg.parallel_num, cond_dim=hidden)
        with torch.device("meta") if extra_on_meta else contextlib.nullcontext():
            self.connector = BitsConnector(cfg.head.bits, hidden)
            self.head = DiffusionHead(head_cfg,
                                      activation_checkpointing=cfg.activation_checkpointing)
        self.pos_embed = PosEmbed2D(hidden, cfg.pos_max_len)  # a computed buffer: never meta
        self.backend = resolve_backend(cfg.attn_backend, "cuda" if torch.cuda.is_available()
                                       else "cpu")
        self.layer_rules = layer_rules(llm)  # the backbone's windows and chunks, per layer type
        check_rules(self.backend, self.layer_rules)
        self._layer_costs = _layer_costs(llm)
        if cfg.activation_checkpointing:
            # Non-reentrant: works with DeepSpeed ZeRO-3 (environment.md); HF only checkpoints
            # in train mode, like the head.
            llm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False})

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: ModelConfig, extra_on_meta: bool = False,
                    llm_weights: Mapping[str, Tensor] | None = None,
                    tokenizer: PreTrainedTokenizerBase | None = None) -> BitDanceModel:
        """Load (or build from scratch) the backbone named by cfg.backbone, add BitDance's tokens,
        and attach freshly initialised connector + head (on meta, see the class doc).
        `llm_weights`: the LLM's state dict (our `llm.` prefix stripped) to load instead of the
        backbone's pretrained weights, which are then never read; `tokenizer`: the backbone's
        text tokenizer where the caller has loaded it (`load_backbone`)."""
        from bdt.model.backbone import load_backbone

        cfg.validate()
        backend = resolve_backend(cfg.attn_backend, "cuda" if torch.cuda.is_available() else "cpu")
        backbone_cfg = replace(cfg.backbone, attn_implementation=hf_attn_implementation(backend))
        bb = load_backbone(backbone_cfg, cfg.parallel_num, weights=llm_weights, tokenizer=tokenizer)
        return cls(cfg, bb.model, bb.special, bb.prompt, bb.tokenizer, extra_on_meta)

    def save_llm_description(self, out_dir: str) -> None:
        """The LLM's config.json and text tokenizer into local `out_dir`, replacing what is there:
        `llm/` of `save_pretrained` without the weights. With a checkpoint's weights, that is all
        it takes to rebuild the model (`from_config(llm_weights=...)`) where the pretrained LLM's
        folder is gone."""
        from bdt import output_dirs

        with output_dirs.staged_dir(out_dir, overwrite=True) as tmp:
            self.llm.config.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)

    def save_pretrained(self, out_dir: str) -> None:
        """`out_dir/llm/` (HF model + tokenizer), connector + head safetensors, the config YAML."""
        from safetensors.torch import save_file

        from bdt.config import to_yaml

        os.makedirs(out_dir, exist_ok=True)
        self.llm.save_pretrained(os.path.join(out_dir, LLM_DIR))
        llm_config_record.record(out_dir, os.path.join(out_dir, LLM_DIR))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(os.path.join(out_dir, LLM_DIR))
        extra = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                 if not k.startswith("llm.")}
        tmp = os.path.join(out_dir, WEIGHTS_NAME + ".tmp")
        save_file(extra, tmp)
        os.replace(tmp, os.path.join(out_dir, WEIGHTS_NAME))
        with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
            f.write(to_yaml(self.cfg))

    @classmethod
    def from_pretrained(cls, model_dir: str, tokenizer: PreTrainedTokenizerBase | None = None,
                        **overrides) -> BitDanceModel:
        """Inverse of `save_pretrained`; `overrides` replace top-level ModelConfig fields
        (e.g. attn_backend="flex"); `tokenizer`: `from_config`'s."""
        cfg = replace(read_model_config(model_dir), **overrides)
        cfg.backbone = replace(cfg.backbone, path=os.path.join(model_dir, LLM_DIR),
                               from_scratch=False)
        model = cls.from_config(cfg, extra_on_meta=True, tokenizer=tokenizer)
        url = os.path.join(model_dir, WEIGHTS_NAME)
        model.load_extra(read_safetensors(url, mmap=True), url)  # on meta: load_extra copies
        return model

    def load_extra(self, state: Mapping[str, Tensor], source: str) -> None:
        """Load the connector + head weights (our names; the LLM's come with the backbone), all
        of them: ValueError naming `source`'s missing, unexpected, mis-shaped, integer and NaN/inf
        keys (bdt.weights.state_dict_problems). With the LLM on the meta device (a shapes-only
        model) it only checks. Connector and head built on meta take the tensors as they are, in
        the dtype they would have been built in."""
        expected = {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}
        problems = state_dict_problems(expected, state)
        if problems:
            raise ValueError(f"{source} does not fit this model (head width "
                             f"{self.cfg.head.width}, depth {self.cfg.head.depth}, P = "
                             f"{self.cfg.parallel_num}, {self.cfg.head.bits} bits): "
                             + "; ".join(problems))
        if self.llm.device.type == "meta":
            return
        on_meta = self.head.input_proj.weight.is_meta
        if on_meta:
            dtype = torch.get_default_dtype()
            # Own copies: the parameters must not share memory with a (memory-mapped) file.
            state = {k: v.to(dtype if v.is_floating_point() else v.dtype, copy=True)
                     for k, v in state.items()}
        self.load_state_dict(state, strict=False, assign=on_meta)

    # --- building blocks shared by training and sampling --------------------------------------

    @property
    def decoder(self) -> nn.Module:
        """The LLM without its LM head (returns last hidden states, final norm applied)."""
        return self.llm.base_model

    def embed_text(self, ids: Tensor) -> Tensor:
        return self.llm.get_input_embeddings()(ids)

    def embed_image(self, bits_NC: Tensor, rc_N2: Tensor) -> Tensor:
        """LLM inputs of image tokens: connector(+-1 bits) + pos2d(row, col) (method §2)."""
        dtype = self.connector.fc1.weight.dtype
        return self.connector(bits_NC.to(dtype)) + self.pos_embed(rc_N2).to(dtype)

    def head_condition(self, hidden_ND: Tensor, rc_N2: Tensor) -> Tensor:
        """Head condition of the tokens at (row, col): predicting hidden + their pos2d (method §3),
        in the head's dtype (the backbone may run in another)."""
        cond_ND = hidden_ND + self.pos_embed(rc_N2).to(hidden_ND.dtype)
        return cond_ND.to(self.head.input_proj.weight.dtype)

    def float_mask_dtype(self) -> torch.dtype | None:
        """The dtype a dense mask must be additive in, or None for bool: eager attention reads
        a bool mask wrongly (environment.md) and HF's flex path adds a dense mask to scores."""
        if getattr(self.llm.config, "_attn_implementation", "") in ("eager", "flex_attention"):
            return self.llm.get_input_embeddings().weight.dtype
        return None

    def set_attn_backend(self, name: str) -> None:
        """Switch the attention backend in place (`auto|sdpa|flex|varlen|flash`), e.g. to compare
        backends on one model."""
        backend = resolve_backend(name, "cuda" if torch.cuda.is_available() else "cpu")
        check_rules(backend, self.layer_rules)
        self.backend = backend
        self.llm.set_attn_implementation(hf_attn_implementation(self.backend))

    def compile_blocks(self, backend: str = "inductor") -> None:
        """torch.compile each decoder layer and the diffusion head in place. Parameter names do
        not change (`nn.Module.compile`), so checkpoints of compiled and eager runs are the same.

        Layer by layer, as torchtitan does: the packing logic around the decoder stays eager,
        and one graph serves every layer (dynamo inlines modules: parameters are inputs). flex
        rows are padded to the stage's budget, so its layers compile for static shapes, once per
        stage; sdpa's per-document rows, varlen's plans and the head's patch count change every
        step, so those compile once for symbolic sizes (automatic dynamic shapes would compile
        twice: static, then again at the first new shape)."""
        layers = getattr(self.decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"compile: {type(self.decoder).__name__} has no `layers` list of "
                             f"decoder layers to compile")
        for layer in layers:
            layer.compile(backend=backend, dynamic=self.backend != "flex")
        self.head.compile(backend=backend, dynamic=True)

    def mask_kwargs(self, layout: BlockCausalLayout) -> dict:
        """attention_mask + position_ids for the decoder call, in the model's backend (a dict
        of masks by layer type where the backbone's layers narrow them differently)."""
        return attention_kwargs(layout.to(self.llm.device), self.backend, self.float_mask_dtype(),
                                self.layer_rules)

    def kv_cache(self):
        """An empty KV cache for sampling whose sliding and chunked layers keep only the keys
        later blocks can see (`bdt.model.kv_cache`: call its drop_unseen after each step);
        `decode_mask` sizes each layer type's mask to them."""
        return kv_cache(layer_kinds(self.llm.config), self.layer_rules)

    def decode_mask(self, key_valid_BK: Tensor, num_new: int) -> Tensor | dict[str, Tensor]:
        """attention_mask of a KV-cached step of num_new tokens (`decode_attention_mask`) against
        the keys a `kv_cache` layer keeps of those key_valid_BK marks, per layer type as
        `mask_kwargs`' masks are."""
        K = key_valid_BK.shape[1]

        def mask(rule):
            start = K - keys_kept(rule, key_valid_BK)
            return decode_attention_mask(key_valid_BK[:, start:], num_new, self.float_mask_dtype(),
                                         rule, dropped_B=key_valid_BK[:, :start].sum(1))
        return by_layer_type(self.layer_rules, mask)

    # --- training -----------------------------------------------------------------------------

    def input_embeddings(self, packed: PackedSequence, bits_NC: Tensor) -> Tensor:
        """[L, D] inputs: text embeddings, image tokens embedded from `bits_NC` (sequence order)."""
        device = self.llm.device
        image_mask_L = packed.image_mask_L.to(device)
        embeds_LD = self.embed_text(packed.input_ids_L.to(device))
        image_LD = self.embed_image(bits_NC.to(device), packed.image_rc_N2.to(device))
        return embeds_LD.masked_scatter(image_mask_L[:, None], image_LD.to(embeds_LD.dtype))

    def hidden_states(self, packed: PackedSequence, inputs_embeds_LD: Tensor,
                      row_len: int | None = None) -> Tensor:
        """[L, D] last hidden states of the packed row (no attention across samples).

        row_len: the length the flex kernels see the row padded to (`flex_row_len`; the trainer
        passes the stage's token budget, so a stage compiles flex once). sdpa ignores it."""
        L = inputs_embeds_LD.shape[0]
        total_len = None if self.backend == "sdpa" else flex_row_len(L, row_len)
        layout = BlockCausalLayout.from_packed(packed.cu_seqlens_S1, packed.causal_len_S,
                                               packed.block_size_S, total_len=total_len)
        if not torch.equal(layout.position_ids_BL[0, :L], packed.position_ids_L.cpu()):
            raise ValueError("packed position_ids do not restart at each sample's start")
        # Dense masks (sdpa) waste the pairs between samples: one row per sample when cheaper.
        split = per_document_rows(packed.cu_seqlens_S1, packed.causal_len_S, packed.block_size_S,
                                  *self._layer_costs) if self.backend == "sdpa" else None
        if split is not None:
            layout, index_L = split
            S, Lmax = layout.doc_ids_BL.shape
            index_L = index_L.to(inputs_embeds_LD.device)
            # Not views: a compiled layer (compile_blocks) would recompile for the first layer,
            # whose input would be a view where the others' are not.
            rows_SLD = inputs_embeds_LD.new_zeros(S, Lmax, inputs_embeds_LD.shape[-1])
            rows_SLD.view(S * Lmax, -1).index_copy_(0, index_L, inputs_embeds_LD)
        else:  # one row, zero-padded to the layout's length (its own padding document)
            rows_SLD = F.pad(inputs_embeds_LD[None], (0, 0, 0, layout.doc_ids_BL.shape[1] - L))
        # use_cache=False: with a cache HF may ignore the packing (environment.md).
        out = self.decoder(inputs_embeds=rows_SLD, use_cache=False, **self.mask_kwargs(layout))
        hidden = out.last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])[index_L] if split is not None else hidden[0, :L]

    def forward(self, packed: PackedSequence, generator: torch.Generator | None = None,
                row_len: int | None = None) -> dict[str, Tensor]:
        """Losses of one packed row: total, text_ce, vision, bit_accuracy (all scalars).
        row_len: see `hidden_states`.

        Random draws, in order (the release's): the exposure-bias flips (r1, r2 over all image
        bits), then the head's t and noise (see `flow_loss`), all from `generator`.
        """
        cfg, device = self.cfg, self.llm.device
        P = int(packed.block_size_S[0])  # a training stage may use a smaller P than the model's
        if not bool((packed.block_size_S == P).all()) or packed.image_bits_NC.shape[0] % P:
            raise ValueError(f"a packed row needs one P for all samples and a multiple of it in "
                             f"image tokens, got P = {packed.block_size_S.tolist()} and "
                             f"{packed.image_bits_NC.shape[0]} tokens")
        bits_NC = packed.image_bits_NC.to(device)
        flipped_NC = flip_bits(bits_NC, cfg.flip_prob, generator) if self.training else bits_NC
        hidden_LD = self.hidden_states(packed, self.input_embeddings(packed, flipped_NC),
                                       row_len)

        text_idx = packed.text_loss_index_T.to(device)
        logits_TV = self.lm_logits(hidden_LD[text_idx])
        text_ce = F.cross_entropy(logits_TV, packed.text_target_T.to(device))

        rc_N2 = packed.image_rc_N2.to(device)
        cond_ND = self.head_condition(hidden_LD[packed.vision_loss_index_N.to(device)], rc_N2)
        D, C = cond_ND.shape[-1], bits_NC.shape[-1]
        x_GPC = bits_NC.view(-1, P, C)
        vision_GP, x_pred = flow_loss(self.head, x_GPC, cond_ND.view(-1, P, D), generator,
                                      return_x_pred=True)
        vision = vision_GP.mean()
        # Per-bit accuracy of the head's x-prediction (diagnostic, issue 4 part 6).
        target = x_GPC.repeat(x_pred.shape[0] // x_GPC.shape[0], 1, 1)
        bit_accuracy = (binarize(x_pred.detach().float()) == target.float()).float().mean()
        total = cfg.text_loss_weight * text_ce + cfg.vision_loss_weight * vision
        return {"total": total, "text_ce": text_ce.detach(), "vision": vision.detach(),
                "bit_accuracy": bit_accuracy}

    def text_logits(self, input_ids_BL: Tensor) -> Tensor:
        """Plain causal LM logits [B, L, V] of text-only rows, through this model's embedding
        and decoder path (the LLM-init check: the wrapper must not change the LLM)."""
        B, L = input_ids_BL.shape
        layout = BlockCausalLayout.stack([BlockCausalLayout.from_packed([0, L], [L], 1)] * B)
        out = self.decoder(inputs_embeds=self.embed_text(input_ids_BL.to(self.llm.device)),
                           use_cache=False, **self.mask_kwargs(layout))
        return self.lm_logits(out.last_hidden_state)

    def lm_logits(self, hidden: Tensor) -> Tensor:
        """fp32 text logits of last hidden states: the LM head and the backbone's own scaling or
        soft-cap of its output (`output_logits`)."""
        return output_logits(self.llm.config, self.llm.get_output_embeddings()(hidden))


def read_model_config(model_dir: str) -> ModelConfig:
    """The ModelConfig a saved BitDanceModel (local or fsspec URL) was written with."""
    from omegaconf import OmegaConf

    from bdt import storage
    from bdt.config import load, read_resolved_yaml

    url = storage.join(model_dir, CONFIG_NAME)
    if not storage.exists(url):
        raise OSError(f"{model_dir!r} is not a saved BitDanceModel: no {CONFIG_NAME}")
    # ConfigError (a ValueError) naming the file when not YAML or not plain values: a model
    # folder may come from anywhere.
    if not read_resolved_yaml(url):
        raise ValueError(f"{url}: holds no model config (an empty file)")
    cfg = OmegaConf.to_object(load(ModelConfig, [url]))  # unknown keys, wrong types: named
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{url}: {e}") from None
    return cfg


def _layer_costs(llm) -> tuple[float, float]:
    """(MACs per token, MACs per query-key pair) of one decoder layer of an HF causal LM: its
    weights (`decoder_matmul_params`, averaged over the layers); QK^T + AV over every head."""
    config = llm.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (decoder_matmul_params(llm) / config.num_hidden_layers, float(2 * heads * head_dim))
