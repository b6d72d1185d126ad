"""What every model family provides: loading, defaults, the request -> pipeline-kwargs adapter, previews."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from PIL import Image

Task = Literal["text-to-image", "image-edit", "image-layers"]


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's recommended sampling settings; a request overrides any of them.

    `width`/`height` of None mean "the pipeline's own default size". `negative_prompt` is what a request that
    names none gets, so that models trained for true CFG (Qwen-Image: a blank negative prompt with
    `true_cfg_scale` 4.0) keep their guidance by default.
    """

    num_inference_steps: int = 50
    true_cfg_scale: float = 1.0
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    layers: int | None = None
    resolution: int | None = None

    def updated(self, overrides: dict[str, Any]) -> GenerationDefaults:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown default(s) {sorted(unknown)}; valid keys: {sorted(names)}")
        return dataclasses.replace(self, **overrides)


@dataclass
class PipelineInputs:
    """One fully resolved generation: what a family's adapter turns into pipeline keyword arguments."""

    prompt: str
    negative_prompt: str | None
    images: list[Image.Image]
    mask: Image.Image | None
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float
    guidance_scale: float | None
    num_outputs: int
    generators: list[torch.Generator]
    layers: int | None = None
    resolution: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ModelFamily:
    """Base class of a registry entry. Subclasses set the class attributes and override what differs."""

    architecture: ClassVar[str]
    """The `_class_name` in model_index.json that selects this family."""
    pipeline_class: ClassVar[str]
    """Name of the diffusers pipeline class that runs it."""
    task: ClassVar[Task] = "text-to-image"
    min_input_images: ClassVar[int] = 0
    max_input_images: ClassVar[int] = 0
    supports_mask: ClassVar[bool] = False
    """True when `mask_pipeline` gives an inpainting pipeline for masked edits."""
    defaults: ClassVar[GenerationDefaults] = GenerationDefaults()

    @property
    def can_edit(self) -> bool:
        return self.max_input_images > 0

    # -- loading -------------------------------------------------------------------------------
    def matches_folder(self, folder: Path) -> bool:
        """For checkpoints published without a model_index.json: True when `folder` is one of this family's."""
        return False

    def load(self, source: str | Path, device: torch.device, dtype: torch.dtype):
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        pipe = cls.from_pretrained(str(source), dtype=dtype)
        return pipe.to(device)

    # -- sizes ---------------------------------------------------------------------------------
    def size_multiple(self, pipe) -> int:
        """Width and height must be multiples of this (VAE downsampling times the 2x2 latent packing)."""
        return pipe.vae_scale_factor * 2

    def check_size(self, pipe, width: int, height: int) -> None:
        """Raise a ValueError for output sizes this model cannot make (beyond the engine's generic limits)."""

    def default_size(self, pipe) -> tuple[int, int]:
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return side, side

    # -- running -------------------------------------------------------------------------------
    def prepare_image(self, image: Image.Image) -> Image.Image:
        """Convert a decoded input image to what the pipeline expects (RGB; transparency over white)."""
        if image.mode == "RGB":
            return image
        if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")

    def prepare_mask(self, mask: Image.Image) -> Image.Image:
        """Convert a decoded mask to what the inpainting pipeline expects."""
        return mask

    def fixed_output_size(
        self, pipe, images: list[Image.Image], resolution: int | None, masked: bool
    ) -> tuple[int, int] | None:
        """For pipelines that size their output themselves: that size (a request cannot choose one); else None."""
        return None

    def output_images(self, pipe, output, inputs: PipelineInputs, final_latents: torch.Tensor) -> list[Image.Image]:
        """The images of a pipeline call's output, flat, in order (`final_latents`: the last step's latents)."""
        return list(output.images)

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        raise NotImplementedError

    def mask_pipeline(self, pipe):
        """The pipeline that runs masked edits (inpainting) for this model, or None when it has none."""
        return None

    def decode_preview(self, pipe, latents: torch.Tensor, inputs: PipelineInputs) -> list[Image.Image]:
        """Decode packed latents of an intermediate step into preview images."""
        raise NotImplementedError

    def preview(
        self, pipe, step_index: int, previous: torch.Tensor | None, current: torch.Tensor, inputs: PipelineInputs
    ) -> list[Image.Image]:
        """A preview of the final image after `step_index`.

        For flow-matching Euler sampling, `current = previous + (s1 - s0) * v`, so the velocity and with it the
        clean-image estimate `x0 = current - s1 * v` follow exactly from two consecutive latents: a far sharper
        preview than decoding the noisy latent itself.
        """
        sigmas = getattr(pipe.scheduler, "sigmas", None)
        estimate = current
        if previous is not None and sigmas is not None and step_index + 1 < len(sigmas):
            s0, s1 = float(sigmas[step_index]), float(sigmas[step_index + 1])
            if s0 != s1:
                velocity = (current - previous) / (s1 - s0)
                estimate = current - s1 * velocity
        return self.decode_preview(pipe, estimate, inputs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.architecture})"
