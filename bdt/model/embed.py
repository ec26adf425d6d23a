"""Image-token inputs of the AR model (method §2): bits connector, 2D sin-cos position embedding,
exposure-bias bit flipping.

An image token's LLM input is ``connector(bits) + pos2d(row, col)``; the diffusion head's
condition reuses the same 2D embedding for the token it predicts. Layouts follow the reference
fixtures (``tests/fixtures/bitdance/README.md``, conventions: 2D position embedding, training bit flips).

Checkpoint key mapping (BitDance ``MLLModel`` -> ours, relative to where the AR model mounts
these modules): ``embed_vision_mlp.fc1.{weight,bias}`` -> ``<connector>.fc1.{weight,bias}``,
``embed_vision_mlp.fc2.{weight,bias}`` -> ``<connector>.fc2.{weight,bias}``; see
``CONNECTOR_KEY_MAP``. The position table is a non-persistent buffer on both sides (no keys).
"""

from __future__ import annotations

import torch
from torch import nn

from bdt.model.sequence import grid_coords

# BitDance MLLModel key suffix -> BitsConnector key (identical names, listed so the full
# 14B mapping can be assembled mechanically).
CONNECTOR_KEY_MAP: dict[str, str] = {
    "embed_vision_mlp.fc1.weight": "fc1.weight",
    "embed_vision_mlp.fc1.bias": "fc1.bias",
    "embed_vision_mlp.fc2.weight": "fc2.weight",
    "embed_vision_mlp.fc2.bias": "fc2.bias",
}


class BitsConnector(nn.Module):
    """MLP from a C-bit token (+-1 floats) to the LLM width D: Linear C->D, GELU-tanh, Linear D->D."""

    def __init__(self, bits: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(bits, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, bits_NC: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(bits_NC)))


def sincos_table_1d(max_len: int, dim: int) -> torch.Tensor:
    """[max_len, dim] table; row p = [sin(p*w_i) for i<dim/2] ++ [cos(p*w_i)], w_i = 10000^(-i/(dim/2)).

    All sines come first (fixture README), unlike the interleaved variants elsewhere.
    """
    if dim % 2:
        raise ValueError(f"sin-cos table dim must be even, got {dim}")
    half = dim // 2
    omega_F = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angle_PF = torch.arange(max_len, dtype=torch.float64)[:, None] * omega_F[None, :]
    return torch.cat([angle_PF.sin(), angle_PF.cos()], dim=1).float()


class PosEmbed2D(nn.Module):
    """Fixed 2D sin-cos embedding of latent-grid coordinates, width D (half per axis).

    embed(row, col) = cat(table[col], table[row]): the FIRST half encodes the column. The table
    holds ``max_grid`` positions per axis (BitDance: pe_max_len 2048 px // 16 = 128); larger grids
    are an error, there is no interpolation.
    """

    def __init__(self, hidden: int, max_grid: int = 128) -> None:
        super().__init__()
        if hidden % 4:
            raise ValueError(f"2D position embedding needs hidden % 4 == 0, got hidden={hidden}")
        self.max_grid = max_grid
        # Non-persistent: derived from (hidden, max_grid), never part of a checkpoint (as in BitDance).
        self.register_buffer("table_GH", sincos_table_1d(max_grid, hidden // 2), persistent=False)

    def forward(self, rc_N2: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, D] for (row, col) coordinates [N, 2] (e.g. ``PackedSequence.image_rc_N2``)."""
        if rc_N2.numel() and int(rc_N2.max()) >= self.max_grid:
            raise ValueError(
                f"latent coordinate {int(rc_N2.max())} exceeds the 2D position table "
                f"({self.max_grid} positions per side)"
            )
        rc_N2 = rc_N2.to(self.table_GH.device)
        return torch.cat([self.table_GH[rc_N2[:, 1]], self.table_GH[rc_N2[:, 0]]], dim=1)

    def grid(self, h: int, w: int, patch_size: int) -> torch.Tensor:
        """[h*w, D] embeddings of an h x w grid in patch-wise raster (sequence) order."""
        return self(grid_coords(h, w, patch_size))


def flip_bits(
    bits: torch.Tensor, p_max: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Exposure-bias noise (method §2): flip each +-1 bit with probability p_max * u, u ~ U(0, 1).

    Draw order matches BitDance (fixture quirk 5): r1 then r2, both shaped like ``bits``; a bit
    flips where r1 < p_max * r2, so the mean flip rate is p_max / 2. Apply to inputs only; the
    loss targets stay clean.
    """
    if p_max <= 0:
        return bits
    kw = dict(dtype=bits.dtype, device=bits.device, generator=generator)
    r1 = torch.rand(bits.shape, **kw)
    r2 = torch.rand(bits.shape, **kw)
    return torch.where(r1 < p_max * r2, -bits, bits)
