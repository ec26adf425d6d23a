"""In-loop sample grid (issue 6 part 5): every `logging.sample_every` steps, generate a few
prompts with the model being trained, decode the bits with the image tokenizer, and write one
PNG per call (<run_dir>/samples/step_N.png).

All randomness comes from generators seeded by `seed` (sampler and a generative decoder alike):
a preview never draws from the global RNG, so it cannot change the training run it observes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from bdt.generation.grid import to_uint8
from bdt.generation.sampling import SamplingConfig, check_prompts, generate
from bdt.training.ar.config import ARLoggingConfig


@torch.no_grad()
def sample_grid(model, decoder, prompts: list[str], hw: tuple[int, int], num_steps: int,
                seed: int) -> Image.Image:
    """One row of len(prompts) images (h x w latent tokens each)."""
    bits_BhwC = generate(model, prompts, hw[0], hw[1],
                         SamplingConfig(num_steps=num_steps, seed=seed))
    images = decoder.decode(bits_BhwC, generator=torch.Generator().manual_seed(seed))
    row_HWC = torch.cat(list(to_uint8(images)), dim=1)  # side by side
    return Image.fromarray(np.ascontiguousarray(row_HWC.numpy()))


def save_grid(image: Image.Image, run_dir: str, step: int) -> str:
    out = os.path.join(run_dir, "samples", f"step_{step:09d}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, out)
    return out


class Preview:
    """An in-loop task of the AR loop (bdt.training.ar.tasks.InLoopTask). Every rank that takes
    part generates (under ZeRO-3 all of them, `together`: the forward passes gather parameters);
    the writing rank saves the PNG."""

    def __init__(self, logging_cfg: ARLoggingConfig, decoder, run_dir: str, seed: int,
                 takes_part: bool, writes: bool, together: bool):
        self.cfg, self.decoder, self.run_dir, self.seed = logging_cfg, decoder, run_dir, seed
        self.active, self.writes = logging_cfg.sample_every > 0 and takes_part, writes
        self.together = together

    def due(self, step: int) -> bool:
        return self.active and step % self.cfg.sample_every == 0

    def check(self, model: torch.nn.Module) -> None:
        if self.active:
            try:
                check_prompts(model, list(self.cfg.sample_prompts), *self.cfg.sample_hw)
            except ValueError as e:
                raise ValueError(f"logging.sample_prompts: {e}") from None

    def run(self, step: int, module: torch.nn.Module,
            stop_point: Callable[[bool], None]) -> dict[str, float]:
        c = self.cfg
        stop_point(self.together)  # the grid is one batch: a stop before it ends the task
        image = sample_grid(module, self.decoder, list(c.sample_prompts), tuple(c.sample_hw),
                            c.sample_steps, self.seed)
        if self.writes:
            save_grid(image, self.run_dir, step)
        return {}
