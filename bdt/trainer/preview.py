"""In-loop sample grid (issue 6 part 5): generate a few prompts with the model being trained,
decode the bits with the image tokenizer, write one PNG per call.

All randomness comes from generators seeded by `seed` (sampler and a generative decoder alike):
a preview never draws from the global RNG, so it cannot change the training run it observes.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from bdt.sampling import SamplingConfig, generate


def load_decoder(tokenizer_dir: str):
    from bdt.tokenizer.io import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@torch.no_grad()
def sample_grid(model, decoder, prompts: list[str], hw: tuple[int, int], num_steps: int,
                seed: int) -> Image.Image:
    """One row of len(prompts) images (h x w latent tokens each)."""
    bits_BhwC = generate(model, prompts, hw[0], hw[1],
                         SamplingConfig(num_steps=num_steps, seed=seed))
    images = decoder.decode(bits_BhwC, generator=torch.Generator().manual_seed(seed))
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    row_HWC = torch.cat(list(pixels.permute(0, 2, 3, 1)), dim=1)  # side by side
    return Image.fromarray(np.ascontiguousarray(row_HWC.numpy()))


def save_grid(image: Image.Image, run_dir: str, step: int) -> str:
    out = os.path.join(run_dir, "samples", f"step_{step:09d}.png")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, out)
    return out
