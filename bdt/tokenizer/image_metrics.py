"""Reconstruction quality: PSNR and SSIM on images in [-1, 1] (evaluated on [0, 1]).

SSIM follows Wang et al. 2004: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data
range 1, per channel over the 'valid' region, averaged; this equals scikit-image's
`structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(recon_BCHW: torch.Tensor, target_BCHW: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB [B] (8-bit style: both images clamped to the valid range)."""
    mse_B = (to_unit(recon_BCHW) - to_unit(target_BCHW)).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse_B.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).float()


def ssim(recon_BCHW: torch.Tensor, target_BCHW: torch.Tensor, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM [B]."""
    x, y = to_unit(recon_BCHW), to_unit(target_BCHW)
    c = x.shape[1]
    g = _gaussian_window(window, sigma).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
