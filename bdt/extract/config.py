"""Typed configuration of the pre-extraction job (loaded with bdt.config.load)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class FamilyConfig:
    """One output family of token shards: the images bucketed around `resolution`^2 pixels, for
    the training stage of that resolution (method §5). The AR trainer's stages
    (bdt.training.ar.config.StageConfig) name a family to read; several may read one."""

    resolution: int = 256
    name: str = ""  # directory of the family under `output`; "" -> str(resolution)
    # Explicit [[W, H], ...] buckets; empty -> the preset (`bucket_preset`, "" -> by resolution,
    # see bdt/data/buckets.py). Sides must be multiples of downsample factor x patch_size.
    buckets: list[list[int]] = field(default_factory=list)
    bucket_preset: str = ""


@dataclass
class ExtractConfig:
    # Input: tar shards (brace pattern, glob or comma list) or image folders with same-named .txt
    # captions; local paths or fsspec URLs (s3://...).
    inputs: str = "???"
    input_format: str = "auto"  # auto | tar | folder (auto: a pattern ending in .tar/.tgz/.tar.gz is tar)
    folder_shard_size: int = 1000  # folder mode: images per input unit (= per output shard)
    output: str = "???"  # root of the token shards + manifest; local path or fsspec URL
    tokenizer: str = "???"  # tokenizer directory (config.json + model.safetensors)
    stages: list[FamilyConfig] = field(default_factory=lambda: [FamilyConfig(resolution=256)])
    patch_size: int = 1  # ps of the AR model (method §4): bucket sides are multiples of f * ps
    # Input hygiene (anything failing goes to the rejects file, never crashes the job).
    image_extensions: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
    min_side: int = 32  # shorter image side in pixels below which an image is rejected
    max_pixels: int = 64_000_000  # decompression-bomb guard (w x h from the header)
    max_image_bytes: int = 64 * 1024 * 1024
    max_caption_bytes: int = 64 * 1024
    # Encoding.
    batch_size: int = 16  # images per tokenizer call; a batch holds one bucket only
    decode_threads: int = 0  # per actor, decoding ahead of the encoder (use on GPU actors; 0 = inline)
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    # Ray.
    num_actors: int = 0  # 0: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # > 0 on GPU clusters: each actor holds the tokenizer on a GPU
    max_retries: int = 3  # restarts of a dead actor, and retries of the shard it was writing
    progress_interval_s: float = 10.0


def stage_name(stage: FamilyConfig) -> str:
    return stage.name or str(stage.resolution)


_DTYPES = ("auto", "float32", "bfloat16")


def encode_dtype(cfg: ExtractConfig) -> str:
    """The dtype the encoder runs in: `auto` is bf16 for actors with a GPU, else fp32. Resolved
    once from the config, so the fingerprint tells a CPU run's shards from a GPU run's."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if cfg.gpus_per_actor > 0 else "float32"


def validate(cfg: ExtractConfig) -> None:
    """Raise ValueError naming the key for values the types alone don't rule out."""
    # An empty output joined with a file name is a path at the filesystem's root (/plan.json).
    for key, what in (("inputs", "the input shards or folders"), ("output", "the output directory"),
                      ("tokenizer", "the tokenizer directory")):
        if not getattr(cfg, key).strip():
            raise ValueError(f"{key}: is empty: name {what}")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got '{cfg.dtype}'")
    for key in ("batch_size", "folder_shard_size", "patch_size", "min_side", "max_pixels",
                "max_image_bytes", "max_caption_bytes"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key}: must be >= 1, got {getattr(cfg, key)}")
    for key in ("decode_threads", "max_retries", "num_actors", "gpus_per_actor"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key}: must be >= 0, got {getattr(cfg, key)}")
    from bdt.data.token_shards import MAX_CAPTION_BYTES

    if cfg.max_caption_bytes > MAX_CAPTION_BYTES:  # training would skip every longer one
        raise ValueError(f"max_caption_bytes: must be <= {MAX_CAPTION_BYTES} (the most the token "
                         f"readers read of a caption), got {cfg.max_caption_bytes}")
    # `not > 0` / `not >= 0` refuse NaN, which fails every comparison.
    if not 0 < cfg.cpus_per_actor < math.inf:
        raise ValueError(f"cpus_per_actor: must be > 0, got {cfg.cpus_per_actor}")
    if not 0 <= cfg.gpus_per_actor < math.inf:
        raise ValueError(f"gpus_per_actor: must be >= 0, got {cfg.gpus_per_actor}")
    if not 0 < cfg.progress_interval_s < math.inf:
        raise ValueError(f"progress_interval_s: must be > 0, got {cfg.progress_interval_s}")
    if not cfg.image_extensions:
        raise ValueError("image_extensions: list at least one (e.g. [jpg, png])")
    _set(cfg, "image_extensions", [e.lower() for e in cfg.image_extensions])  # one form for every reader
    _check_formats(cfg.image_extensions)
    if cfg.min_side ** 2 > cfg.max_pixels:
        raise ValueError(f"min_side: {cfg.min_side} px a side needs {cfg.min_side ** 2} pixels, more than "
                         f"max_pixels {cfg.max_pixels}: every image would be rejected")
    from bdt.extract.manifest import RESERVED_NAMES

    names = [stage_name(s) for s in cfg.stages]
    for i, name in enumerate(names):
        # A family is a directory under `output`: '..' or a '/' would write outside it; hidden
        # names are the output's temp files, the reserved ones its manifest, plan and rejects.
        if name in names[:i] or name.startswith(".") or "/" in name or name in RESERVED_NAMES:
            raise ValueError(f"stages[{i}]: name '{name}' must be unique, a plain directory name (no "
                             f"'/', not starting with '.') and none of the output's own {list(RESERVED_NAMES)}")


# PIL lists these but cannot read them, or reads them only through Ghostscript, a program that
# should not run on untrusted files.
_UNSAFE_FORMATS = {"EPS": "read through Ghostscript, unsafe on untrusted data"}


def _check_formats(extensions: list[str]) -> None:
    from PIL import Image

    from bdt.data.images import formats_for

    formats_for(extensions)  # each must name a format PIL knows
    Image.init()
    for ext in extensions:
        fmt = Image.registered_extensions()[f".{ext}"]
        why = _UNSAFE_FORMATS.get(fmt) or ("" if fmt in Image.OPEN else "PIL can write it, not read it")
        if why:
            raise ValueError(f"image_extensions: '{ext}' ({fmt}) is refused: {why}")


def _set(cfg: ExtractConfig, key: str, value) -> None:
    """Set a key of a config that bdt.config.load made read-only (or of a plain dataclass)."""
    from omegaconf import OmegaConf, read_write

    if OmegaConf.is_config(cfg):
        with read_write(cfg):
            setattr(cfg, key, value)
    else:
        setattr(cfg, key, value)
