"""The BAGEL network: everything in `ema.safetensors`, under the checkpoint's own parameter names.

`BagelModel.forward` is one denoising evaluation of one CFG branch: it packs the noisy latents into the
generation block `[<|vision_start|>, latent tokens..., <|vision_end|>]`, runs it through the MoT language model
against the branch's prefilled context and returns the velocity of the latent tokens. It is the
`pipe.transformer` that the engine counts and TeaCache hooks (its blocks: `language_model.model.layers`).
The `prefill_*` methods build a branch's context from text, ViT image and clean VAE image blocks; they run
the same layers without going through `forward`.

Position rules (1-D RoPE): a text block takes consecutive positions; every token of an image block, its two
marker tokens included, shares one position, after which the next position is one more. The 2-D layout of
an image enters only through the additive sin-cos tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from diffusers.models.cache_utils import CacheMixin
from torch import nn

from .config import BagelConfig
from .llm import BagelLanguageModel, KVContext
from .packing import grid_position_ids, patchify
from .vit import SiglipVisionModel

TIMESTEP_FREQUENCY_DIM = 256


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] (not scaled by 1000) -> [cos(t f), sin(t f)] over 128 frequencies -> MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FREQUENCY_DIM, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIMESTEP_FREQUENCY_DIM // 2
        frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * frequencies[None]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return self.mlp(features.to(next(self.mlp.parameters()).dtype))


class MLPConnector(nn.Module):
    """ViT features -> language model width."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PositionTable(nn.Module):
    """A frozen 2-D sin-cos table (stored in the checkpoint; see `packing.sincos_2d_table`)."""

    def __init__(self, side: int, hidden_size: int):
        super().__init__()
        self.side = side
        self.pos_embed = nn.Parameter(torch.zeros(side * side, hidden_size), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class BagelModel(nn.Module, CacheMixin):
    # CacheMixin's methods that the pipeline calls, typed here: mypy does not read diffusers and would otherwise
    # resolve them through nn.Module.__getattr__.
    cache_context: Callable[[str], AbstractContextManager[None]]
    _reset_stateful_cache: Callable[[], None]

    def __init__(self, config: BagelConfig):
        super().__init__()
        self.config = config
        hidden = config.llm.hidden_size
        self.language_model = BagelLanguageModel(config.llm)
        self.vit_model = SiglipVisionModel(config.vit)
        self.connector = MLPConnector(config.vit.hidden_size, hidden)
        self.vit_pos_embed = PositionTable(config.vit_max_num_patch_per_side, hidden)
        self.time_embedder = TimestepEmbedder(hidden)
        self.vae2llm = nn.Linear(config.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, config.patch_latent_dim)
        self.latent_pos_embed = PositionTable(config.max_latent_size, hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    def new_context(self) -> KVContext:
        return KVContext.empty(self.config.llm.num_hidden_layers)

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(token_ids.to(self.device))

    def _image_block(self, markers: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        """[<|vision_start|>, body..., <|vision_end|>] for body [batch, tokens, hidden]; markers: the two ids."""
        start, end = self._embed(markers)[None].expand(body.shape[0], -1, -1).to(body.dtype).split(1, dim=1)
        return torch.cat([start, body, end], dim=1)

    def _latent_block(self, latents: torch.Tensor, timestep: float, grid: tuple[int, int], markers: torch.Tensor):
        """The generation block for patchified latents [batch, rows * columns, patch_latent_dim] at flow time t."""
        rows, columns = grid
        positions = grid_position_ids(rows, columns, self.latent_pos_embed.side, self.device)
        t = torch.full((1,), float(timestep), device=self.device)
        body = (
            self.vae2llm(latents.to(self.device, self.dtype)) + self.time_embedder(t) + self.latent_pos_embed(positions)
        )
        return self._image_block(markers, body)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: float,
        *,
        context: KVContext,
        grid: tuple[int, int],
        markers: torch.Tensor,
    ) -> torch.Tensor:
        """Velocity [batch, tokens, patch_latent_dim] (float32) of noisy latents at flow time `timestep`.

        The velocity points from data to noise (v = noise - x0): a sampler steps with x <- x - v * dt.
        """
        block = self._latent_block(latents, timestep, grid, markers)
        length = block.shape[1]
        hidden = self.language_model.model.run(
            block, [context.next_position] * length, context=context, gen_tokens=slice(1, length - 1)
        )
        return self.llm2vae(hidden[:, 1:-1]).float()

    # -- building a branch's context ---------------------------------------------------------------------------
    def prefill_text(self, context: KVContext, token_ids: list[int]) -> None:
        """A text block (already wrapped in <|im_start|> ... <|im_end|>), causal, understanding expert."""
        start = context.next_position
        hidden = self._embed(torch.tensor(token_ids))[None]
        positions = list(range(start, start + len(token_ids)))
        self.language_model.model.run(hidden, positions, context=context, gen_tokens=None, causal=True, store=True)

    def prefill_vit_image(self, context: KVContext, pixels: torch.Tensor, markers: torch.Tensor) -> None:
        """An image [3, H, W] in [-1, 1] (sides multiples of the ViT patch) as ViT tokens, understanding expert."""
        patch = self.config.vit.patch_size
        positions = grid_position_ids(
            pixels.shape[1] // patch, pixels.shape[2] // patch, self.vit_pos_embed.side, self.device
        )
        patches = patchify(pixels.to(self.device, self.dtype), patch)
        features = self.connector(self.vit_model.vision_model(patches, positions)) + self.vit_pos_embed(positions)
        self._prefill_image_block(context, self._image_block(markers, features[None]), gen_tokens=None)

    def prefill_vae_image(
        self, context: KVContext, latents: torch.Tensor, grid: tuple[int, int], markers: torch.Tensor
    ) -> None:
        """Clean patchified latents [batch, tokens, patch_latent_dim] at t = 0, generation expert."""
        block = self._latent_block(latents, 0.0, grid, markers)
        self._prefill_image_block(context, block, gen_tokens=slice(1, block.shape[1] - 1))

    def _prefill_image_block(self, context: KVContext, block: torch.Tensor, gen_tokens: slice | None) -> None:
        positions = [context.next_position] * block.shape[1]
        self.language_model.model.run(block, positions, context=context, gen_tokens=gen_tokens, store=True)
