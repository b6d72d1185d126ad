"""The FLUX.1 autoencoder under its original (BFL) parameter names, as BAGEL's `ae.safetensors` stores them.

Encoder: conv_in, one level per channel multiplier (residual blocks, then a stride-2 conv except at the last
level), a middle block (residual, self-attention with 1x1 convs, residual), GroupNorm, conv_out to the mean
and log-variance. Decoder: the mirror image, with one more residual block per level and nearest-neighbour
upsampling; `decoder.up.{i}` is stored by resolution level (0 = full resolution).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .config import AutoencoderConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, kernel_size=1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as FLUX was trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MiddleBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: residual blocks, then an optional resampler (`downsample` or `upsample`)."""

    def __init__(self, channels: list[int], resample: str | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in itertools.pairwise(channels))
        if resample == "downsample":
            self.downsample = Downsample(channels[-1])
        elif resample == "upsample":
            self.upsample = Upsample(channels[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                x = getattr(self, name)(x)
        return x


class Encoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_multipliers]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(config.image_channels, config.channels, kernel_size=3, padding=1)
        inputs = [config.channels, *widths[:-1]]
        self.down = nn.ModuleList(
            Level([inputs[i]] + [widths[i]] * config.num_res_blocks, "downsample" if i < last else None)
            for i in range(len(widths))
        )
        self.mid = MiddleBlock(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        widths = [config.channels * m for m in config.channel_multipliers]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MiddleBlock(widths[-1])
        # up[i] works at resolution level i and reads the output of level i + 1 (the middle block for the last).
        inputs = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(
            Level([inputs[i]] + [widths[i]] * (config.num_res_blocks + 1), "upsample" if i > 0 else None)
            for i in range(len(widths))
        )
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.image_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class FluxAutoencoder(nn.Module):
    """Images in [-1, 1] <-> scaled latents `scale * (z - shift)` with z_channels channels at 1/downsample size."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def encode(self, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Sample the posterior of one image [1, 3, H, W] once per generator: [len(generators), z, H/8, W/8].

        BAGEL samples (rather than taking the mean), with noise drawn on the CPU like its reference code.
        """
        mean, log_variance = self.encoder(images).float().chunk(2, dim=1)
        noise = torch.cat([torch.randn(mean.shape, generator=g) for g in generators]).to(mean.device)
        z = mean + torch.exp(0.5 * log_variance) * noise
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.config.scale_factor + self.config.shift_factor
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype))
