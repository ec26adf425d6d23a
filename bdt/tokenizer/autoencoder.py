"""The convolutional binary autoencoder of BitDance (method §1), state-dict compatible with the
released `ae_d16c32` / `ae_d32c128` / `ae_d32c256` tokenizers (module names and shapes follow
the released key lists in tests/fixtures/bitdance/tokenizer_keys_*.json).

Layouts: images are BCHW in [-1, 1]; the encoder output / decoder input is BChw (one channel per
bit); the public bit layout is B x h x w x C bool (True = +1), see `encode`/`decode`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdt.tokenizer.config import TokenizerConfig
from bdt.tokenizer.quantizer import QuantizerOutput, SignQuantizer

_NORM_EPS = 1e-6
_STYLE_EPS = 1e-6  # added to the variance of the bits before the square root (adaptive norm)


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_NORM_EPS)


def depth_to_space(x_BCHW: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """DCR order, as the release: out[c, f*h+i, f*w+j] = in[(f*i+j)*C' + c, h, w].

    (torch.pixel_shuffle uses the other, CRD, order: in[c*f*f + f*i + j].)
    """
    b, c, h, w = x_BCHW.shape
    c_out = c // (factor * factor)
    x = x_BCHW.view(b, factor, factor, c_out, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c_out, h * factor, w * factor)


class ResBlock(nn.Module):
    """norm -> swish -> conv3x3 (no bias), twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        # Attribute order = the released state-dict order (norms first).
        self.norm1 = _group_norm(groups, in_ch)
        self.norm2 = _group_norm(groups, out_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class Upsample(nn.Module):
    """conv3x3 to 4C then depth-to-space x2 (sub-pixel upsampling instead of nearest + conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv1(x), 2)


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine, then scale/shift predicted from the bits' per-channel statistics.

    scale = gamma(std_hw(bits)), shift = beta(mean_hw(bits)). The variance is the unbiased one
    (divides by h*w - 1), as the released weights were trained with; for a single-token map
    (h*w == 1), where that is undefined, the population variance (0) is used instead.
    """

    def __init__(self, z_channels: int, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=_NORM_EPS, affine=False)
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x_BCHW: torch.Tensor, bits_BZhw: torch.Tensor) -> torch.Tensor:
        correction = 1 if bits_BZhw.shape[2] * bits_BZhw.shape[3] > 1 else 0
        var_BZ = torch.var(bits_BZhw, dim=(2, 3), correction=correction)
        scale_BC = self.gamma(torch.sqrt(var_BZ + _STYLE_EPS))
        shift_BC = self.beta(bits_BZhw.mean(dim=(2, 3)))
        return self.norm(x_BCHW) * scale_BC[:, :, None, None] + shift_BC[:, :, None, None]


class _Level(nn.Module):
    """One resolution level: `block` (ResBlocks) plus an optional resampler (key names as released)."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int):
        super().__init__()
        self.block = nn.ModuleList(
            [ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_blocks)])


class Encoder(nn.Module):
    """conv_in -> per level ResBlocks (+ stride-2 conv between levels) -> mid ResBlocks -> 1x1 to z."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        in_ch = cfg.ch
        for i, width in enumerate(widths):
            level = _Level(in_ch, width, cfg.num_res_blocks, cfg.norm_groups)
            if i < len(widths) - 1:
                level.downsample = nn.Conv2d(width, width, 3, stride=2, padding=1)
            self.down.append(level)
            in_ch = width
        self.mid_block = nn.ModuleList([ResBlock(in_ch, in_ch, cfg.norm_groups)
                                        for _ in range(cfg.num_res_blocks)])
        self.norm_out = _group_norm(cfg.norm_groups, in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.z_channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BCHW)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid_block:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder; each level starts with an adaptive norm conditioned on the bits.

    With `generative=True` (the released GANDecoder), N(0,1) noise of the bits' shape is
    concatenated after the bits at the input, so decoding is stochastic; the adaptive norms still
    see the bits only.
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.generative = cfg.gan_decoder
        widths = [cfg.ch * m for m in cfg.ch_mult]
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels * (2 if self.generative else 1), in_ch, 3, padding=1)
        self.mid_block = nn.ModuleList([ResBlock(in_ch, in_ch, cfg.norm_groups)
                                        for _ in range(cfg.num_res_blocks)])
        # Built deepest first; stored so that up[i] / adaptive[i] belong to resolution level i.
        up: list[nn.Module] = []
        adaptive: list[nn.Module] = []
        for i in reversed(range(len(widths))):
            adaptive.append(AdaptiveGroupNorm(cfg.z_channels, in_ch, cfg.norm_groups))
            level = _Level(in_ch, widths[i], cfg.num_res_blocks, cfg.norm_groups)
            if i > 0:
                level.upsample = Upsample(widths[i])
            up.append(level)
            in_ch = widths[i]
        self.up = nn.ModuleList(up[::-1])
        self.adaptive = nn.ModuleList(adaptive[::-1])
        self.norm_out = _group_norm(cfg.norm_groups, in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_ch, 3, padding=1)

    def forward(self, bits_BZhw: torch.Tensor, noise_BZhw: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = bits_BZhw
        if self.generative:
            if noise_BZhw is None:
                # One draw from the default (or given) generator, in the bits' shape and dtype:
                # with torch.manual_seed(s) right before, this is the release's randn_like.
                noise_BZhw = torch.randn(bits_BZhw.shape, generator=generator,
                                         dtype=bits_BZhw.dtype, device=bits_BZhw.device)
            x = torch.cat([bits_BZhw, noise_BZhw.to(bits_BZhw.dtype)], dim=1)
        h = self.conv_in(x)
        for block in self.mid_block:
            h = block(h)
        for i in reversed(range(len(self.up))):
            h = self.adaptive[i](h, bits_BZhw)
            for block in self.up[i].block:
                h = block(h)
            if i > 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class BinaryAutoencoder(nn.Module):
    """Encoder -> sign quantizer (straight-through) -> adaptive-norm decoder."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        if not isinstance(cfg, TokenizerConfig):  # a dict or the trainer's omegaconf `model:` node
            cfg = TokenizerConfig.from_dict(cfg)
        self.config = cfg = cfg.validate()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantizer = SignQuantizer(cfg)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def bits_per_token(self) -> int:
        return self.config.bits_per_token

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def _check_images(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if images_BCHW.dim() != 4 or images_BCHW.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be B x {self.config.in_channels} x H x W, got shape "
                             f"{list(images_BCHW.shape)}")
        if not images_BCHW.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images_BCHW.dtype}")
        h, w = images_BCHW.shape[2:]
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"image size {h}x{w} (HxW) is not divisible by the tokenizer's "
                             f"downsample factor {f}; crop or resize to multiples of {f}")
        # Under autocast the convs cast for themselves; otherwise match the module's dtype.
        param = self._param()
        return images_BCHW.to(device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> bits B x h x w x C bool (True = +1; strict z > 0, so 0 -> False)."""
        z_BChw = self.encoder(self._check_images(images_BCHW))
        return (z_BChw > 0).permute(0, 2, 3, 1).contiguous()

    @torch.no_grad()
    def decode(self, bits_BhwC: torch.Tensor, noise_BhwC: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Bits B x h x w x C (bool, or float ±1) -> images B x out_ch x H x W (not clamped).

        For a generative decoder the noise comes from `noise_BhwC`, else `generator`, else the
        default torch generator (seed it for reproducible decodes).
        """
        if bits_BhwC.dim() != 4 or bits_BhwC.shape[-1] != self.bits_per_token:
            raise ValueError(f"bits must be B x h x w x {self.bits_per_token} (bits per token), got shape "
                             f"{list(bits_BhwC.shape)}")
        param = self._param()
        if bits_BhwC.dtype == torch.bool:
            bits_BhwC = torch.where(bits_BhwC, 1.0, -1.0)
        pm1 = bits_BhwC.to(device=param.device, dtype=param.dtype)
        noise = None if noise_BhwC is None else noise_BhwC.permute(0, 3, 1, 2)
        return self.decoder(pm1.permute(0, 3, 1, 2), noise, generator)

    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Training pass: (reconstruction B x out_ch x H x W, quantizer output with the losses)."""
        z_BChw = self.encoder(self._check_images(images_BCHW))
        quant = self.quantizer(z_BChw)
        return self.decoder(quant.quantized), quant
