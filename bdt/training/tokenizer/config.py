"""The tokenizer training job's configuration tree (`deepspeed tokenizers/train.py --config
configs/tokenizer/<name>.yaml [key=value]`).

    run_dir:     local run directory: metrics, reconstruction grids, export/, config.yaml
    model:       the tokenizer, as TokenizerConfig's flat fields (the released `ddconfig` form is
                 read from a tokenizer directory's config.json, not from this YAML)
    data:        raw image-caption shards, crop size, workers (bdt/data/raw.py)
    optim, deepspeed, checkpoint, logging: as in the AR trainer (bdt/training/)
    loss:        pixel, LPIPS, quantizer and discriminator terms (method §1)
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Sequence

from bdt.config import load
from bdt.data.raw import RawDataConfig, expand_shards
from bdt.entry import split_launcher_args
from bdt.tokenizer.config import TokenizerConfig
from bdt.tokenizer.lpips import LPIPS
from bdt.training.config import CheckpointConfig, LoggingConfig, check_run_dir
from bdt.training.deepspeed_config import DeepSpeedConfig, OptimConfig

# Keys of this config before both trainers shared one vocabulary (bdt.config.load names the new
# key when a YAML or the command line still uses an old one).
RENAMED_KEYS = {"out_dir": "run_dir", "ckpt": "checkpoint", "log": "logging"}


@dataclass
class LossConfig:
    pixel: str = "l1"  # l1 | l2
    pixel_weight: float = 1.0
    quantizer_weight: float = 1.0  # x QuantizerOutput.loss (its commitment/entropy weights: model:)
    lpips_weight: float = 0.0
    lpips_backbone: str = ""  # local torchvision vgg16 state dict
    lpips_head: str = ""  # local LPIPS vgg.pth (lin0..lin4)
    disc_weight: float = 0.0  # 0 disables the discriminator (method §1: ~0.1)
    disc_start: int = 0  # optimizer step at which the adversarial terms start
    disc_adaptive: bool = True  # VQGAN adaptive weight from the decoder's last-layer gradients
    disc_lr: float = 1e-4
    disc_width: int = 64
    disc_layers: int = 3
    lecam_weight: float = 0.0  # method §1: 0.05


@dataclass
class TokenizerLoggingConfig(LoggingConfig):
    image_every: int = 200  # reconstruction grid PNG, 0 = never
    num_images: int = 8


@dataclass
class TokenizerTrainConfig:
    run_dir: str = "???"  # local run directory: logs, images, export/, config.yaml
    steps: int = 1000  # optimizer steps
    # Horizon of the LR schedule (0 = steps). Lets a run stop early at `steps` and resume later
    # on the same cosine curve (bench/tokenizer_quality.py scores a fixed step count that way).
    schedule_steps: int = 0
    time_limit_min: float = 0.0  # > 0: stop (save + export) after this many minutes of training
    seed: int = 0
    ema_decay: float = 0.999  # 0 = export the live weights
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: RawDataConfig = field(default_factory=RawDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=500))
    logging: TokenizerLoggingConfig = field(default_factory=TokenizerLoggingConfig)


def load_command(argv: Sequence[str]) -> tuple[TokenizerTrainConfig, bool]:
    """The config of a `tokenizers/train.py [--config X.yaml ...] [--export-only] [key=value ...]`
    command line (several --config files merge left to right, overrides last), and whether it
    asks for the export only, which reads no data: data.shards may stay unset for it."""
    args, _ = split_launcher_args(argv)
    parser = argparse.ArgumentParser(prog="tokenizers/train.py",
                                     description="Train a binary image tokenizer (keys: "
                                                 "bdt/training/tokenizer/config.py).")
    parser.add_argument("--config", action="append", default=[], help="YAML file (repeatable)")
    parser.add_argument("--export-only", action="store_true",
                        help="export the newest checkpoint's EMA weights to <run_dir>/export and exit")
    parser.add_argument("overrides", nargs="*", help="key=value")
    ns = parser.parse_intermixed_args(args)  # key=value may come before or after the options
    cfg = load(TokenizerTrainConfig, ns.config, ns.overrides, renamed=RENAMED_KEYS,
               unused=["data.shards"] if ns.export_only else ())
    return cfg, ns.export_only


def validate(cfg: TokenizerTrainConfig) -> TokenizerConfig:
    """Check the config before any process group or model exists; returns the model config.
    `cfg` is usually the loaded omegaconf node, so the sections' checks are called unbound."""
    if cfg.deepspeed.zero_stage == 3:
        raise ValueError("deepspeed.zero_stage: tokenizer training supports 0-2 (EMA and the adaptive "
                         "GAN weight need full parameters on every rank)")
    if cfg.loss.pixel not in ("l1", "l2"):
        raise ValueError(f"loss.pixel: expected 'l1' or 'l2', got '{cfg.loss.pixel}'")
    if cfg.schedule_steps < 0:
        raise ValueError(f"schedule_steps must be >= 0 (0 = steps), got {cfg.schedule_steps}")
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    check_run_dir(cfg.run_dir)
    for section, check in ((cfg.checkpoint, CheckpointConfig.validate),
                           (cfg.logging, LoggingConfig.validate), (cfg.optim, OptimConfig.validate),
                           (cfg.deepspeed, DeepSpeedConfig.validate),
                           (cfg.data, RawDataConfig.validate)):
        check(section)
    for key, value, ok, expected in _value_rules(cfg):
        if not ok:
            raise ValueError(f"{key} must be {expected}, got {value!r}")
    if cfg.loss.disc_weight > 0:
        _check_discriminator(cfg.loss.disc_width, cfg.loss.disc_layers, cfg.data.size)
    model_cfg = TokenizerConfig.from_dict(cfg.model)
    if cfg.data.size % model_cfg.downsample_factor:
        raise ValueError(f"data.size {cfg.data.size} is not divisible by the model's downsample factor "
                         f"{model_cfg.downsample_factor}")
    # Then the files it names.
    if cfg.loss.lpips_weight > 0:
        LPIPS.from_local(cfg.loss.lpips_backbone, cfg.loss.lpips_head)
    expand_shards(cfg.data.shards)
    return model_cfg


def _check_discriminator(width: int, layers: int, size: int) -> None:
    """What PatchDiscriminator can be built from and run on, checked before training (both once
    failed only when the discriminator first ran, loss.disc_start steps in)."""
    for i in range(1, layers + 1):  # its GroupNorms: min(32, C // 4) groups of C channels
        channels = width * min(2 ** i, 8)
        groups = min(32, channels // 4)
        if groups < 1 or channels % groups:
            raise ValueError(f"loss.disc_width = {width}: its layer {i} has {channels} channels, "
                             f"which its GroupNorm cannot split into {max(groups, 1)} groups "
                             f"(a multiple of 16 always works)")
    # `layers` stride-2 convolutions halve the crop, then two 4x4 ones take 3 pixels off.
    if size < 3 * 2 ** layers:
        raise ValueError(f"loss.disc_layers = {layers} needs crops of at least {3 * 2 ** layers} "
                         f"px; data.size is {size} (fewer layers, or larger crops)")


def _value_rules(cfg: TokenizerTrainConfig) -> list[tuple[str, object, bool, str]]:
    """(key, value, within its range, the range); NaN fails every comparison, so it is refused."""
    loss, logs = cfg.loss, cfg.logging
    rules = [("seed", cfg.seed, 0 <= cfg.seed < 2**53, "in [0, 2^53)"),  # x 1000 + rank: 64 bits
             ("ema_decay", cfg.ema_decay, 0 <= cfg.ema_decay < 1, "in [0, 1) (0 = off)"),
             ("time_limit_min", cfg.time_limit_min, cfg.time_limit_min >= 0, ">= 0 (0 = no limit)"),
             ("logging.image_every", logs.image_every, logs.image_every >= 0, ">= 0 (0 = never)"),
             ("loss.disc_start", loss.disc_start, loss.disc_start >= 0, ">= 0")]
    rules += [(f"loss.{k}", getattr(loss, k), 0 <= getattr(loss, k) < math.inf,
               "a finite number >= 0")
              for k in ("pixel_weight", "quantizer_weight", "lpips_weight", "disc_weight",
                        "lecam_weight", "disc_lr")]
    if logs.image_every > 0:
        rules.append(("logging.num_images", logs.num_images, logs.num_images >= 1, ">= 1"))
    if loss.disc_weight > 0:
        rules += [(f"loss.{k}", getattr(loss, k), getattr(loss, k) >= 1, ">= 1")
                  for k in ("disc_width", "disc_layers")]
    return rules
