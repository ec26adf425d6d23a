"""Image grids for `bdt sample`, `bdt eval` and previews: tensors in [-1, 1] -> PIL images, tiled with
optional pass/fail frames (green = the judge passed the image, red = failed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

PASS_RGB, FAIL_RGB = (40, 180, 60), (220, 40, 40)


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """Decoder outputs in [-1, 1] (any float dtype) -> uint8 pixels [B, H, W, C] on the CPU."""
    pixels = ((images_BCHW.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu()


def to_pil(images_BCHW: torch.Tensor) -> list[Image.Image]:
    """Decoder outputs in [-1, 1] -> RGB PIL images, rounded to uint8."""
    return [Image.fromarray(np.ascontiguousarray(p.numpy()), "RGB") for p in to_uint8(images_BCHW)]


def make_grid(images: Sequence[Image.Image], cols: int = 8, pad: int = 4,
              marks: Sequence[bool | None] | None = None) -> Image.Image:
    """Tile `images` row-major in cells of the largest width x height (smaller ones centred),
    `pad` px apart on white. With `marks`, each image gets a frame inside its padding: green for
    True, red for False, none for None."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if marks is not None and len(marks) != len(images):
        raise ValueError(f"{len(marks)} marks for {len(images)} images")
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    cw, ch = max(im.width for im in images), max(im.height for im in images)
    canvas = Image.new("RGB", (cols * (cw + pad) + pad, rows * (ch + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    frame = max(1, pad // 2)
    for i, im in enumerate(images):
        x0 = pad + (i % cols) * (cw + pad) + (cw - im.width) // 2
        y0 = pad + (i // cols) * (ch + pad) + (ch - im.height) // 2
        canvas.paste(im.convert("RGB"), (x0, y0))
        mark = None if marks is None else marks[i]
        if mark is not None:
            draw.rectangle([x0 - frame, y0 - frame, x0 + im.width + frame - 1,
                            y0 + im.height + frame - 1], outline=PASS_RGB if mark else FAIL_RGB,
                           width=frame)
    return canvas
