"""A trained model ready to turn prompts into images (what `bdt sample` and `bdt eval` use), and the
parts every reader of one builds it from alike (load.py): the image tokenizer checked against the
model, an attention backend that runs here, the buckets it was trained on.

Buckets: a side must be a multiple of the tokenizer's downsample factor x the model's patch side
(method §4: whole ps x ps patches of tokens). When the training shards' manifests are reachable,
the buckets they hold are the ones the model was trained for, and others are refused unless
`any_bucket` (2D positions outside the trained grids are extrapolation).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from bdt import storage
from bdt.generation.grid import to_pil
from bdt.generation.sampling import SamplingConfig, check_prompts, generate
from bdt.model.ar import BitDanceModel
from bdt.model.attention import resolve_backend
from bdt.training import run_dir as layout

log = logging.getLogger(__name__)


def parse_bucket(text: str) -> tuple[int, int]:
    """'128' -> (128, 128); '96x64' -> (W=96, H=64), in pixels."""
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise ValueError(f"bucket {text!r}: expected S or WxH in pixels, e.g. 128 or 96x64"
                         ) from None
    if len(parts) > 2 or w <= 0 or h <= 0:
        raise ValueError(f"bucket {text!r}: expected S or WxH with positive sides, e.g. 96x64")
    return w, h


@dataclass
class TrainedModel:
    model: BitDanceModel
    decoder: torch.nn.Module  # the image tokenizer (BinaryAutoencoder); only decode is used
    source: str = ""
    buckets: list[tuple[int, int]] | None = None  # (W, H) px trained on; None = unknown

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def decoder_device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def unit(self) -> int:
        """Bucket sides must be multiples of this many pixels."""
        return self.decoder.downsample_factor * self.model.cfg.patch_size

    def token_grid(self, width: int, height: int, any_bucket: bool = False) -> tuple[int, int]:
        """(h, w) latent tokens of a width x height px bucket; ValueError if unusable."""
        f, ps = self.decoder.downsample_factor, self.model.cfg.patch_size
        if width < 1 or height < 1:
            raise ValueError(f"bucket {width}x{height}: sides must be positive")
        if width % self.unit or height % self.unit:
            raise ValueError(f"bucket {width}x{height}: sides must be multiples of {self.unit} px "
                             f"(tokenizer downsample {f} x patch side {ps} of P="
                             f"{self.model.cfg.parallel_num})")
        if not any_bucket and self.buckets is not None and (width, height) not in self.buckets:
            known = ", ".join(f"{w}x{h}" for w, h in self.buckets)
            raise ValueError(f"bucket {width}x{height} was not trained (the training shards hold "
                             f"{known}); pass --any-bucket to sample it anyway")
        return height // f, width // f

    @torch.no_grad()
    def images(self, prompts: Sequence[str], width: int, height: int,
               sampling: SamplingConfig, batch: int = 8, any_bucket: bool = False,
               progress: bool = True, desc: str = "sampling") -> list[Image.Image]:
        """One image per prompt. Batch k (of `batch` prompts) samples with a seed drawn from
        (sampling.seed, k) and decodes with a generator of that seed: reproducible for a given
        batch size, and no batch of one seed repeats a batch of another (seed + k did: seed 1's
        batches were seed 0's from the second on)."""
        from tqdm import tqdm

        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        h, w = self.token_grid(width, height, any_bucket)
        check_prompts(self.model, prompts, h, w)  # all of them, before the first batch samples
        out: list[Image.Image] = []
        with tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress) as bar:
            for k, chunk in enumerate(batches(prompts, batch)):
                out += self.batch_images(k, chunk, h, w, sampling)
                bar.update(len(chunk))
        return out

    def batch_images(self, k: int, prompts: Sequence[str], h: int, w: int,
                     sampling: SamplingConfig) -> list[Image.Image]:
        """Batch k of `images` (its prompts, on an h x w token grid): the same images whichever
        process makes it."""
        # bf16 autocast on GPU (the released models run in bf16); CPU stays fp32, where bf16
        # is slower at these widths (tokenizers/README.md).
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        seed = batch_seed(sampling.seed, k)
        with autocast:
            bits_BhwC = generate(self.model, list(prompts), h, w, replace(sampling, seed=seed))
            # on the decoder's device: a generative decoder draws its noise there
            gen = torch.Generator(device=self.decoder_device).manual_seed(seed)
            return to_pil(self.decoder.decode(bits_BhwC, generator=gen))


def batches(prompts: Sequence[str], batch: int) -> list[list[str]]:
    """The prompts of each batch of a sampling run, in order."""
    return [list(prompts[start:start + batch]) for start in range(0, len(prompts), batch)]


def batch_seed(seed: int, k: int) -> int:
    """The seed of batch k of a sampling run seeded `seed` (63 bits, for torch.Generator)."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> 1)


def runnable_backend(name: str, device: str | torch.device) -> str:
    """The attention backend the model trained with where it runs on `device`, else `auto`:
    a model trained with varlen or flash (CUDA kernels) samples on a CPU or without flash-attn
    too, and sampling's masks are the same in every backend (bdt.model.attention)."""
    try:
        resolve_backend(name, torch.device(device))
    except ValueError as e:
        log.warning("the model's attention backend does not run here (%s): sampling with "
                    "'auto'", e)
        return "auto"
    return name


def load_decoder(path: str, model: BitDanceModel, device: str | torch.device) -> torch.nn.Module:
    """The image tokenizer at `path`, refused unless it decodes the bits the model samples (another
    one failed at the first decode, after a whole batch was sampled, naming no file)."""
    from bdt.tokenizer.io import load_tokenizer

    decoder = load_tokenizer(path, device=device)
    bits = decoder.config.bits_per_token
    if bits != model.cfg.head.bits:
        raise OSError(f"{path}: this image tokenizer decodes {bits}-bit tokens, the model samples "
                      f"{model.cfg.head.bits}-bit ones: it is not the model's tokenizer")
    return decoder


def trained_buckets(train_config_path: str, relative_ok: bool = False
                    ) -> list[tuple[int, int]] | None:
    """Union of the buckets in the training stages' extraction manifests; None when any stage's
    manifest is unreachable (plain shard dirs, moved data): then only the divisibility check.
    `relative_ok`: relative shards are read from the working directory (a run's own record)."""
    from bdt.data.shard_source import list_shards

    cfg = layout.read_config(train_config_path)
    stages = cfg.get("stages")
    if not OmegaConf.is_list(stages) or not all(
            OmegaConf.is_dict(s) and isinstance(s.get("shards"), str) for s in stages):
        return None  # not a record the trainer wrote: buckets unknown
    found: list[tuple[int, int]] = []
    for stage in stages:
        if not (relative_ok or storage.is_remote(stage.shards) or os.path.isabs(stage.shards)):
            return None  # relative to a working directory that is not known (older exports)
        try:
            shards = list_shards(stage.shards, stage.get("family", ""),
                                 allow_incomplete=True)  # buckets only
        except Exception:  # noqa: BLE001 - best effort (moved data, no credentials): then unknown
            return None
        if shards.manifest is None:
            return None
        families = shards.manifest.get("stages", {})
        family = stage.get("family", "") or next(iter(families), "")
        for w, h in families.get(family, {}).get("buckets", []):
            if (w, h) not in found:
                found.append((int(w), int(h)))
    return found or None
