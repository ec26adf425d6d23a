"""Architecture + quantizer settings of a binary image tokenizer (method §1).

On disk (a tokenizer directory's `config.json`, or the `model:` block of a `configs/tokenizer/*.yaml`)
the config is the flat field set of `TokenizerConfig`. `TokenizerConfig.from_dict` also takes the
released BitDance constructor form as it is, `{"ddconfig": {...}, "gan_decoder": ...}`, so a
config file shipped with the official weights loads without conversion. Keys starting with `_`
(metadata such as diffusers' `_class_name`) are ignored, and so are the released constructors'
arguments that no weight depends on (`resolution`, `double_z`, VQModel's `checkpoint`); any other
unknown key, or a value of the wrong type, is an error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

# Arguments of the released Encoder/Decoder/VQModel that no weight depends on (VQModel's
# `checkpoint` is a torch file it would unpickle; its weights come from our weights file).
_IGNORED = ("resolution", "checkpoint")
# The released Encoder/Decoder: what a `ddconfig` must give, and its one default that differs from
# ours (theirs is a 8x-down shape; ours, ae_d16c32's 16x, is what every released config spells out).
_RELEASE_REQUIRED = ("ch", "out_ch", "in_channels", "num_res_blocks", "z_channels")
_RELEASE_DEFAULTS = {"ch_mult": [1, 2, 2, 4]}
_MAX_WIDTH, _MAX_LEVELS, _MAX_RES_BLOCKS = 16384, 10, 64  # released: 2048, 6 (32x), 4
_MAX_IMAGE_CHANNELS = 16  # RGB is 3; room for extra planes, not for a hostile allocation


def _has_type(value: Any, name: str) -> bool:
    """Is `value` of the annotated type `name` (int, float, bool, list[int]); no bool as a number."""
    if name == "list[int]":
        return isinstance(value, (list, tuple)) and all(_has_type(v, "int") for v in value)
    if name == "bool":
        return isinstance(value, bool)
    return isinstance(value, int if name == "int" else (int, float)) and not isinstance(value, bool)


@dataclass
class TokenizerConfig:
    """Defaults are the released `ae_d16c32` (16x down, 32 bits/token), used by every BitDance model."""

    # Architecture: the names of the released `ddconfig` and VQModel(gan_decoder=...).
    ch: int = 256
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 4
    z_channels: int = 32  # bits per token
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False  # ignored, as by the release: a binary tokenizer has no variance channels
    gan_decoder: bool = False  # generative decoder: N(0,1) noise concatenated to the bits
    # GroupNorm groups on every feature map (32 in the release; no weights depend on it). Narrow
    # models want fewer: at width 32, 32 groups is instance norm, which erases flat backgrounds.
    norm_groups: int = 32
    # Quantizer losses (group-wise lookup-free entropy, BitDance GFQ defaults; commitment per method §1).
    entropy_group_size: int = 8  # bits per group: 2**8 implicit codes
    entropy_temperature: float = 0.01
    sample_entropy_weight: float = 1.0  # per-sample entropy is minimised
    codebook_entropy_weight: float = 1.0  # batch code entropy is maximised
    commitment_weight: float = 0.25

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def bits_per_token(self) -> int:
        return self.z_channels

    def validate(self) -> "TokenizerConfig":
        """Raise ValueError naming the field when the values cannot build a model."""
        self._check_types()
        if not self.ch_mult:
            raise ValueError("tokenizer config: ch_mult must list at least one level, got []")
        widths = [self.ch * m for m in self.ch_mult]
        if self.ch < 1 or min(self.ch_mult) < 1:  # two negatives multiply to a positive width
            raise ValueError(f"tokenizer config: ch and every ch_mult must be >= 1, got "
                             f"ch={self.ch}, ch_mult={list(self.ch_mult)}")
        for key in ("in_channels", "out_ch"):  # image channels: RGB is 3
            if not 1 <= getattr(self, key) <= _MAX_IMAGE_CHANNELS:
                raise ValueError(f"tokenizer config: {key} must be in [1, {_MAX_IMAGE_CHANNELS}], "
                                 f"got {getattr(self, key)}")
        if self.norm_groups < 1:
            raise ValueError(f"tokenizer config: norm_groups must be >= 1, got {self.norm_groups}")
        bad = [w for w in widths if w <= 0 or w % self.norm_groups]
        if bad:
            raise ValueError(f"tokenizer config: every level width ch*ch_mult must be a positive multiple "
                             f"of norm_groups={self.norm_groups}; ch={self.ch}, ch_mult={list(self.ch_mult)} "
                             f"gives {widths}")
        if self.num_res_blocks < 1:
            raise ValueError(f"tokenizer config: num_res_blocks must be >= 1, got {self.num_res_blocks}")
        # Far beyond any released tokenizer: a hostile value would hang or overflow the build.
        for key, value, limit in (("ch*ch_mult", max(widths), _MAX_WIDTH),
                                  ("len(ch_mult)", len(self.ch_mult), _MAX_LEVELS),
                                  ("num_res_blocks", self.num_res_blocks, _MAX_RES_BLOCKS),
                                  ("z_channels", self.z_channels, _MAX_WIDTH)):
            if value > limit:
                raise ValueError(f"tokenizer config: {key} is {value}, above the limit {limit}")
        if self.z_channels < 1 or self.entropy_group_size < 1 or self.z_channels % self.entropy_group_size:
            raise ValueError(f"tokenizer config: z_channels ({self.z_channels}) must be a positive multiple "
                             f"of entropy_group_size ({self.entropy_group_size})")
        if self.entropy_group_size > 16:
            raise ValueError(f"tokenizer config: entropy_group_size {self.entropy_group_size} would score "
                             f"2**{self.entropy_group_size} codes per group; use <= 16 (BitDance uses 8)")
        if not 0 < self.entropy_temperature < math.inf:  # also refuses NaN
            raise ValueError(f"tokenizer config: entropy_temperature must be > 0, got {self.entropy_temperature}")
        for key in ("sample_entropy_weight", "codebook_entropy_weight", "commitment_weight"):
            if not 0 <= getattr(self, key) < math.inf:
                raise ValueError(f"tokenizer config: {key} must be a finite number >= 0, "
                                 f"got {getattr(self, key)}")
        return self

    def _check_types(self) -> None:
        """JSON gives any type: "false" would be true, and 1.5 or "112" would pass as ch_mult."""
        for f in dataclasses.fields(self):
            if not _has_type(getattr(self, f.name), f.type):
                raise ValueError(f"tokenizer config: {f.name} must be {f.type}, "
                                 f"got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """The flat on-disk form (all fields)."""
        out = dataclasses.asdict(self)
        out["ch_mult"] = list(out["ch_mult"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TokenizerConfig":
        """Accept our flat form, the released nested `ddconfig` form, or an omegaconf node."""
        if not isinstance(data, dict):
            try:  # an omegaconf DictConfig (the trainer's `model:` block)
                from omegaconf import OmegaConf
                data = OmegaConf.to_container(data, resolve=True)  # type: ignore[assignment]
            except ValueError:  # not an omegaconf node: a plain mapping, or not a mapping at all
                pass
        if not isinstance(data, Mapping):
            raise ValueError(f"tokenizer config: expected a mapping (JSON object), got {type(data).__name__}")
        flat = {k: v for k, v in data.items()
                if not str(k).startswith("_") and k not in ("ddconfig", *_IGNORED)}
        nested = data.get("ddconfig", {})
        if not isinstance(nested, Mapping):
            raise ValueError(f"tokenizer config: 'ddconfig' must be a mapping, got {type(nested).__name__}")
        nested = {k: v for k, v in nested.items() if k not in _IGNORED}
        if "ddconfig" in data:
            missing = [k for k in _RELEASE_REQUIRED if k not in nested]
            if missing:
                raise ValueError(f"tokenizer config: 'ddconfig' lacks {missing} (the released "
                                 f"Encoder and Decoder require them)")
            nested = {**_RELEASE_DEFAULTS, **nested}
        clash = sorted(set(nested) & set(flat))
        if clash:
            raise ValueError(f"tokenizer config: {clash} given both inside 'ddconfig' and at the top level")
        flat.update(nested)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - names)
        if unknown:
            raise ValueError(f"tokenizer config: unknown key(s) {unknown}; known keys: {sorted(names)} "
                             f"(or the released form with 'ddconfig' + 'gan_decoder')")
        z = flat.get("z_channels", cls.z_channels)
        if "entropy_group_size" not in flat and _has_type(z, "int") and z > 0:
            # The groups only shape the training loss; a released VQModel of 12 bits builds and
            # runs, so a config that does not say takes the largest group (<= 8) dividing z.
            flat["entropy_group_size"] = math.gcd(z, cls.entropy_group_size)
        return cls(**flat).validate()
