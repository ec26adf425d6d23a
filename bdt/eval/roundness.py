"""Is a component the judge matched to the circle template really a disc?

Soft IoU against the circle template tolerates what a 64 px render does to a small circle (its
best IoU is ~0.82), and so also passes regular pentagons and hexagons, rotated ellipses (a 45
degree ellipse fills a square box) and a Gaussian smear. Two measures along rays from the
coverage's centroid tell them apart:
- the outline radius per direction (the coverage summed along the ray, so anti-aliasing gives it
  sub-pixel precision): a disc's is flat, an n-gon's ripples with period n, an ellipse's with 2;
- the width of the soft edge (the coverage's 0..1 ramp along the ray) relative to the radius: a
  drawn disc's edge is a few pixels wide whatever its size, a smear's grows with it.
Limits were set on the dataset's own circles at 64, 128 and 512 px, clean, JPEG 75, blurred and
noised (none crosses them), on the demo tokenizer's reconstructions of them (the best a model
can draw through that decoder: 1-2% of them fail, against 13% at the tightest ripple limit that
the renders allow), and against polygons, ellipses and smears drawn the same way: at 64 px
pentagons, hexagons, ellipses of 1.3:1 and smears are refused; heptagons and octagons are too
close to a disc at that size to refuse reliably.
"""

from __future__ import annotations

import numpy as np

RAYS = 72        # directions: harmonics up to RAYS/2, far above the 8 that are checked
RAY_STEP = 0.25  # working px between coverage samples along a ray
# Largest relative ripple (harmonics 2..8) of the outline radius: a 1 px ripple at any radius
# (pixel grid, JPEG blocks and the tokenizer's decoder move a small disc's outline by that
# much), at least 5% (a regular hexagon's is larger; 6% lets hexagons through at 64 px).
RIPPLE_PX, RIPPLE_MIN = 1.0, 0.05
# Largest edge width (sqrt(pi) x integral of a(1 - a) along a ray: the sigma of a Gaussian-
# blurred edge) over the radius: the dataset's circles reach 0.25 (14 px, JPEG 75), smears 0.3.
EDGE_MAX = 0.275


def _sample(alpha: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Bilinear samples of `alpha` at (y, x), zero outside it."""
    a = np.pad(alpha, 1)
    y = np.clip(y + 1, 0, a.shape[0] - 1.001)
    x = np.clip(x + 1, 0, a.shape[1] - 1.001)
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0
    return (a[y0, x0] * (1 - fy) * (1 - fx) + a[y0 + 1, x0] * fy * (1 - fx)
            + a[y0, x0 + 1] * (1 - fy) * fx + a[y0 + 1, x0 + 1] * fy * fx)


def is_disc(alpha: np.ndarray) -> bool:
    """Does coverage map `alpha` (working scale, zero off the component) show a filled disc?"""
    yy, xx = np.mgrid[:alpha.shape[0], :alpha.shape[1]]
    total = alpha.sum()
    cy, cx = (alpha * yy).sum() / total, (alpha * xx).sum() / total
    r = np.arange(0, np.hypot(*alpha.shape), RAY_STEP)
    t = np.arange(RAYS) * (2 * np.pi / RAYS)
    along = _sample(alpha, cy + np.sin(t)[:, None] * r, cx + np.cos(t)[:, None] * r)
    radius = along.sum(1) * RAY_STEP
    mean = radius.mean()
    ripple = np.abs(np.fft.rfft(radius)[2:9]).max() * 2 / RAYS / mean
    edge = np.sqrt(np.pi) * np.median((along * (1 - along)).sum(1) * RAY_STEP) / mean
    return ripple <= max(RIPPLE_MIN, RIPPLE_PX / mean) and edge <= EDGE_MAX
