"""The whole AR model's configuration: backbone + bits connector + 2D pos-emb + diffusion head.

One dataclass tree (omegaconf structured, see `bdt.config.load`) so a training YAML can say
`model.parallel_num: 4`, `model.head.width: 768` or `model.head.mlp: plain`. Defaults follow
method §2-5 (BitDance T2I): text CE weight 0.01, vision flow loss weight 1.0, exposure-bias
p = 0.1, caption dropout 0.1.

`parallel_num` (P) is the one authority on tokens per AR step: the model builds its head with
`head.tokens = parallel_num` and `head.cond_dim = ` the LLM's hidden size, whatever those two
head keys say (they exist for standalone heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from bdt.model.attention import BACKENDS
from bdt.model.backbone_config import BackboneConfig, _torch_dtype
from bdt.model.head import HeadConfig
from bdt.model.sequence import patch_side

MAX_POS_LEN = 16384  # model.pos_max_len's upper limit (validate)


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    # Tokens per AR step, P = ps * ps (method §4: 1, 4, 16, 64).
    parallel_num: int = 16
    # Rows of the 1D sin-cos table per axis: 2048 px / 16 px per token = 128 (method §2).
    pos_max_len: int = 128
    text_loss_weight: float = 0.01
    vision_loss_weight: float = 1.0
    # Exposure bias (method §2): an input bit flips with probability p*u, u ~ U(0,1).
    flip_prob: float = 0.1
    # Caption dropout for CFG (method §2): the packer applies it; kept with the model's recipe.
    caption_dropout: float = 0.1
    # auto | sdpa | flex | varlen | flash (bdt.model.attention); auto = sdpa everywhere for now.
    attn_backend: str = "auto"
    # Activation checkpointing of the decoder layers and the head blocks (method §5).
    activation_checkpointing: bool = False

    @property
    def patch_size(self) -> int:
        return patch_side(self.parallel_num)

    def validate(self) -> None:
        """Raise ValueError naming the first bad key."""
        if self.attn_backend not in BACKENDS:
            raise ValueError(f"model.attn_backend: unknown attention backend "
                             f"{self.attn_backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.parallel_num < 1:  # patch_side's isqrt would name only itself
            raise ValueError(f"model.parallel_num: parallel_num (P) must be a perfect square "
                             f">= 1, got {self.parallel_num}")
        try:
            patch_side(self.parallel_num)
        except ValueError as e:
            raise ValueError(f"model.parallel_num: {e}") from None
        try:  # checked when the LLM loads, after the process group and the run lock: now
            _torch_dtype(self.backbone.dtype)
        except ValueError as e:
            raise ValueError(f"model.backbone.dtype: {e}") from None
        # 16k tokens a side is 256k px at 16x down (released: 128 to 256); 1e9 allocated a
        # 256 GB position table after the LLM had loaded, and failed there naming no key.
        if not 1 <= self.pos_max_len <= MAX_POS_LEN:
            raise ValueError(f"model.pos_max_len must be in [1, {MAX_POS_LEN}], got "
                             f"{self.pos_max_len}")
        for key in ("flip_prob", "caption_dropout"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.{key} must be in [0, 1], got {value}")
        for key in ("text_loss_weight", "vision_loss_weight"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"model.{key} must be a finite number >= 0, got {value}")
        self.head.validate()
