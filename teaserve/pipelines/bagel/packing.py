"""How BAGEL turns images into token sequences: patches, position ids and the 2-D sin-cos position tables."""

from __future__ import annotations

import torch


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[..., channels, H, W] -> [..., patches, p * p * channels]: patches row-major, values (row, column, channel).

    The same packing serves ViT pixels (14 x 14 patches) and VAE latents (2 x 2 patches of 16 channels).
    """
    *lead, channels, height, width = x.shape
    p, n = patch_size, len(lead)
    x = x.reshape(*lead, channels, height // p, p, width // p, p)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)
    return x.reshape(*lead, (height // p) * (width // p), p * p * channels)


def unpatchify(tokens: torch.Tensor, rows: int, columns: int, patch_size: int) -> torch.Tensor:
    """Inverse of `patchify` for [batch, rows * columns, p * p * channels] -> [batch, channels, H, W]."""
    batch, p = tokens.shape[0], patch_size
    x = tokens.reshape(batch, rows, columns, p, p, -1)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, -1, rows * p, columns * p)


def grid_position_ids(rows: int, columns: int, side: int, device: torch.device | None = None) -> torch.Tensor:
    """Row-major ids `row * side + column` of a rows x columns grid in a side x side position table."""
    return (torch.arange(rows, device=device)[:, None] * side + torch.arange(columns, device=device)).flatten()


def sincos_2d_table(side: int, dim: int) -> torch.Tensor:
    """The frozen 2-D sin-cos table [side * side, dim] of `vit_pos_embed` and `latent_pos_embed`.

    Row `row * side + column`: the first half of the channels encodes the column, the second half the row; each
    half is [sin(pos * w), cos(pos * w)] with w_k = 10000^(-k / (dim / 4)).
    """
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coordinates = torch.arange(side, dtype=torch.float64)
    rows = coordinates.repeat_interleave(side)
    columns = coordinates.repeat(side)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(columns), encode(rows)], dim=1).float()
