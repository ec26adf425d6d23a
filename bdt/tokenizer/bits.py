"""Bit storage and layouts for binary tokens.

Packing: a token of C bits is stored as C/8 bytes (uint8). Bit k of a token goes to byte k // 8
at value 2**(k % 8), i.e. LSB first inside each byte (numpy `bitorder="little"`). This is the same
order as the quantizer's group code index, so with groups of 8 bits byte j of a packed token IS
the entropy-loss code of group j.

Layouts (C = bits per token, True / 1 = +1):
  bits map  B x h x w x C   (what `BinaryAutoencoder.encode` returns)
  tokens    B x (h*w) x C   patch-raster order with patch side `ps` (ps = sqrt(tokens per AR
            step)): patches row-major over the map, tokens row-major inside each patch, as the
            BitDance next-patch model consumes them; ps = 1 is plain row-major raster order.
Functions accept numpy arrays or torch tensors and return the same kind.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def _check_channels(num_bits: int) -> None:
    if num_bits % 8:
        raise ValueError(f"bits per token must be a multiple of 8 to pack into bytes, got {num_bits}")


def pack_bits(bits: Array) -> Array:
    """bool/0-1 [..., C] -> uint8 [..., C/8], LSB first within each byte."""
    _check_channels(bits.shape[-1])
    if isinstance(bits, np.ndarray):
        return np.packbits(bits.astype(bool), axis=-1, bitorder="little")
    groups = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    return (groups * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Array, num_bits: int) -> Array:
    """uint8 [..., C/8] -> bool [..., C]; exact inverse of `pack_bits`."""
    _check_channels(num_bits)
    if packed.shape[-1] * 8 != num_bits:
        raise ValueError(f"packed tokens have {packed.shape[-1]} bytes, expected {num_bits // 8} "
                         f"for {num_bits} bits per token")
    if isinstance(packed, np.ndarray):
        if packed.dtype != np.uint8:
            raise ValueError(f"packed tokens must be uint8, got {packed.dtype}")
        return np.unpackbits(packed, axis=-1, bitorder="little").astype(bool)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed tokens must be uint8, got {packed.dtype}")
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], num_bits).bool()


def to_pm1(bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bool/0-1 -> ±1 float (True -> +1)."""
    return torch.where(bits.bool(), 1.0, -1.0).to(dtype)


def from_pm1(values: torch.Tensor) -> torch.Tensor:
    """±1 (or any real) -> bool with the tokenizer's strict rule: > 0 is True, 0 is False."""
    return values > 0


def map_to_tokens(bits_BhwC: Array, ps: int = 1) -> Array:
    """B x h x w x C -> B x (h*w) x C in patch-raster order with patch side `ps`."""
    b, h, w, c = bits_BhwC.shape
    if h % ps or w % ps:
        raise ValueError(f"token map {h}x{w} is not divisible by the patch side {ps}")
    x = bits_BhwC.reshape(b, h // ps, ps, w // ps, ps, c)
    x = x.transpose(0, 1, 3, 2, 4, 5) if isinstance(x, np.ndarray) else x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * w, c)


def tokens_to_map(tokens_BLC: Array, h: int, w: int, ps: int = 1) -> Array:
    """Inverse of `map_to_tokens`: B x (h*w) x C -> B x h x w x C."""
    b, length, c = tokens_BLC.shape
    if length != h * w:
        raise ValueError(f"{length} tokens cannot fill a {h}x{w} map ({h * w} tokens)")
    if h % ps or w % ps:
        raise ValueError(f"token map {h}x{w} is not divisible by the patch side {ps}")
    x = tokens_BLC.reshape(b, h // ps, w // ps, ps, ps, c)
    x = x.transpose(0, 1, 3, 2, 4, 5) if isinstance(x, np.ndarray) else x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)
