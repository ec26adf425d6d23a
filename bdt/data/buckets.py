"""Aspect-ratio buckets: the fixed output sizes images are resized + center-cropped to (method §5).

BitDance trains at native aspect ratio on a small set of output sizes: 11 buckets near 1 MP
(2048x512 .. 1024x1024 .. 512x2048) and 7 near 0.25 MP (1024x256 .. 512x512 .. 256x1024). The
release names only the counts and the end points, so the interior shapes here are our choice:
widths step down from 4:1 to 1:1 and each height is the multiple nearest the target area.

Shapes are written in sixteenths of the base side ("units"): at base 1024 one unit is 64 px,
so (32, 8) is 2048x512. That generalises both lists to any base resolution. Every bucket side
must be a multiple of `multiple` = tokenizer downsample factor x patch side, so that the token
grid (W/f) x (H/f) cuts into whole ps x ps patches (method §4).
"""

from __future__ import annotations

import math
from typing import Sequence

# (W, H) in units of base/16; the transposed (tall) shapes are added by `_with_transposes`.
_WIDE_11 = [(32, 8), (28, 9), (24, 10), (20, 12), (18, 14), (16, 16)]  # 1024 base: 2048x512 .. 1024x1024
_WIDE_7 = [(32, 8), (24, 10), (20, 12), (16, 16)]  # 512 base: 1024x256, 768x320, 640x384, 512x512


def _with_transposes(wide: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    tall = [(h, w) for (w, h) in reversed(wide) if w != h]
    return list(wide) + tall


# Named presets selectable from configs ("bitdance_11" / "bitdance_7").
PRESETS: dict[str, list[tuple[int, int]]] = {
    "bitdance_11": _with_transposes(_WIDE_11),
    "bitdance_7": _with_transposes(_WIDE_7),
}


def default_preset(base: int) -> str:
    """BitDance pairs the 11-bucket list with its 1 MP stage and the 7-bucket list below it."""
    return "bitdance_11" if base >= 1024 else "bitdance_7"


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)


def make_buckets(base: int, multiple: int, preset: str | None = None) -> list[tuple[int, int]]:
    """(W, H) buckets for a base resolution, every side a multiple of `multiple`.

    Shapes that collapse onto the same size after rounding (small bases) appear once.
    """
    if base <= 0 or multiple <= 0:
        raise ValueError(f"buckets: base ({base}) and multiple ({multiple}) must be positive")
    if base % multiple:
        raise ValueError(f"buckets: base resolution {base} is not a multiple of {multiple} "
                         f"(tokenizer downsample factor x patch side)")
    name = preset or default_preset(base)
    if name not in PRESETS:
        raise ValueError(f"buckets: unknown preset '{name}'; known: {sorted(PRESETS)}")
    out: list[tuple[int, int]] = []
    for uw, uh in PRESETS[name]:
        size = (_round_to(uw * base / 16, multiple), _round_to(uh * base / 16, multiple))
        if size not in out:
            out.append(size)
    return out


def check_buckets(buckets: Sequence[Sequence[int]], multiple: int) -> list[tuple[int, int]]:
    """Validate a user-given bucket list; returns it as (W, H) tuples."""
    out: list[tuple[int, int]] = []
    if not buckets:
        raise ValueError("buckets: the list is empty")
    for b in buckets:
        if len(b) != 2:
            raise ValueError(f"buckets: each bucket is [W, H], got {list(b)}")
        w, h = int(b[0]), int(b[1])
        if w <= 0 or h <= 0 or w % multiple or h % multiple:
            raise ValueError(f"buckets: [{w}, {h}] must have positive sides that are multiples of "
                             f"{multiple} (tokenizer downsample factor x patch side)")
        if (w, h) in out:
            raise ValueError(f"buckets: [{w}, {h}] is listed twice")
        out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height, compared in log space.

    Log space makes 2:1 and 1:2 equally far from 1:1. Ties go to the earlier bucket in the list,
    so the choice is deterministic.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"nearest_bucket: image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))
