"""A toy model family in one module: everything a new model brings to teaserve, registered on import.

The model is a small flow-matching transformer over 8x8 pixel patches (no VAE, no text encoder: a prompt is
embedded from its bytes). Its blocks are adaLN-modulated MLPs, so TeaCache's gate is their modulated input. The
module declares the family (loading, defaults, the request -> pipeline adapter), the pipeline, the block metadata
diffusers' hooks need and the cache target; nothing else in teaserve names it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models.cache_utils import CacheMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

from teaserve.cache import CacheTarget, register_cache_target
from teaserve.pipelines import GenerationDefaults, ModelFamily, PipelineInputs, register_family

ARCHITECTURE = "ToyPatchPipeline"
PATCH = 8
CHANNELS = 3 * PATCH * PATCH


class ToyBlock(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = torch.nn.Linear(dim, 2 * dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def modulate(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(temb).chunk(2, dim=-1)
        return self.norm(hidden_states) * (1 + scale[:, None]) + shift[:, None]

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.modulate(hidden_states, temb))


class ToyTransformer(ModelMixin, ConfigMixin, CacheMixin):
    @register_to_config
    def __init__(self, dim: int = 32, depth: int = 4):
        super().__init__()
        self.dim = dim
        self.patch_in = torch.nn.Linear(CHANNELS, dim)
        self.prompt_embedding = torch.nn.EmbeddingBag(256, dim)
        self.time_embedding = torch.nn.Linear(dim, dim)
        self.blocks = torch.nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.patch_out = torch.nn.Linear(dim, CHANNELS)

    def forward(self, hidden_states: torch.Tensor, prompt_ids: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        frequencies = torch.exp(-math.log(1000.0) * torch.arange(self.dim // 2) / (self.dim // 2))
        angles = timestep.float()[:, None] * 1000.0 * frequencies[None]
        temb = self.time_embedding(torch.cat([angles.sin(), angles.cos()], dim=-1)) + self.prompt_embedding(prompt_ids)
        hidden = self.patch_in(hidden_states)
        for block in self.blocks:
            hidden = block(hidden_states=hidden, temb=temb)
        return self.patch_out(hidden)


class ToyPatchPipeline(DiffusionPipeline):
    def __init__(self, transformer: ToyTransformer, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        width: int,
        height: int,
        num_inference_steps: int,
        generator: list[torch.Generator],
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs=("latents",),
    ) -> ImagePipelineOutput:
        tokens = (height // PATCH) * (width // PATCH)
        latents = torch.stack([torch.randn(tokens, CHANNELS, generator=g) for g in generator])
        prompt_ids = torch.tensor([list(prompt.encode()[:64] or b" ")]).expand(len(generator), -1)
        self.scheduler.set_timesteps(num_inference_steps)
        for index, timestep in enumerate(self.scheduler.timesteps):
            with self.transformer.cache_context("cond"):
                velocity = self.transformer(
                    hidden_states=latents, prompt_ids=prompt_ids, timestep=(timestep / 1000).expand(len(latents))
                )
            latents = self.scheduler.step(velocity, timestep, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                callback_on_step_end(self, index, timestep, {"latents": latents})
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=decode(latents, width, height))


def decode(latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    rows, columns = height // PATCH, width // PATCH
    patches = latents.reshape(len(latents), rows, columns, 3, PATCH, PATCH)
    pixels = patches.permute(0, 1, 4, 2, 5, 3).reshape(len(latents), height, width, 3)
    values = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(image)) for image in values]


class ToyFamily(ModelFamily):
    architecture = ARCHITECTURE
    pipeline_class = ARCHITECTURE
    defaults = GenerationDefaults(num_inference_steps=12, width=32, height=32)

    def load(self, source, device, dtype):
        settings = json.loads((Path(source) / "toy.json").read_text())
        torch.manual_seed(settings["seed"])
        transformer = ToyTransformer(settings["dim"], settings["depth"]).eval()
        return ToyPatchPipeline(transformer, FlowMatchEulerDiscreteScheduler()).to(device, dtype)

    def size_multiple(self, pipe) -> int:
        return PATCH

    def default_size(self, pipe) -> tuple[int, int]:
        return 32, 32

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        return {
            "prompt": inputs.prompt,
            "width": inputs.width,
            "height": inputs.height,
            "num_inference_steps": inputs.num_inference_steps,
            "generator": inputs.generators,
        }

    def decode_preview(self, pipe, latents, inputs):
        return decode(latents, inputs.width, inputs.height)


def build_toy_model(folder: str | Path, *, dim: int = 32, depth: int = 4, seed: int = 0) -> Path:
    """A loadable folder of the toy model: its model_index.json names the architecture."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": ARCHITECTURE}))
    (folder / "toy.json").write_text(json.dumps({"dim": dim, "depth": depth, "seed": seed}))
    return folder


TransformerBlockRegistry.register(
    ToyBlock, TransformerBlockMetadata(return_hidden_states_index=None, return_encoder_hidden_states_index=None)
)
register_cache_target(
    ToyTransformer,
    CacheTarget(
        blocks=lambda transformer: transformer.blocks,
        gate=lambda block, arguments: block.modulate(arguments["hidden_states"], arguments["temb"]),
        defaults={"tea_cache": {"coefficients": (0.0, 0.0, 0.0, 1.0, 0.0)}},
    ),
)
register_family(ToyFamily())
