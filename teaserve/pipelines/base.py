"""What every model family provides: loading, defaults, the request -> pipeline-kwargs adapter, previews."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

Task = Literal["text-to-image", "image-edit", "image-layers", "text-to-video", "image-to-video"]
VIDEO_TASKS: tuple[Task, ...] = ("text-to-video", "image-to-video")
MAX_FRAMES = 1024
"""The schema's ceiling on frames per video; the engine's pixel limits decide what a server makes."""
TextEmbedding = tuple[torch.Tensor | None, ...]
"""One text encoded by a family's `encode_text` (e.g. Qwen-Image: the embeddings and their mask or None)."""


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
    extra: dict[str, Any] = field(default_factory=dict)
    """The model-only knobs of the request, validated by the family's `knobs` model, defaults filled in."""
    prompt_embedding: TextEmbedding | None = None
    """`prompt` as the family's `encode_text` encoded it, if the engine did: the pipeline then gets it instead of the
    text. Shared with later requests: never written to."""
    negative_embedding: TextEmbedding | None = None
    """`negative_prompt` encoded likewise (only when the request runs true CFG)."""

    @property
    def true_cfg(self) -> bool:
        """Whether the pipeline runs true CFG: diffusers' pipelines do exactly when they get a negative prompt and a
        scale above 1."""
        return self.true_cfg_scale > 1 and self.negative_prompt is not None


BatchStepCallback = Callable[[int, torch.Tensor], None]
"""Called after each step of a batched run with the step index and the latents of every output row."""


class KnobValueError(ValueError):
    """A model-only parameter's value that the loaded checkpoint cannot take (`ModelFamily.check_knobs`)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        """The parameter."""


class ModelKnobs(BaseModel):
    """Base of a family's model-only request parameters (e.g. how many layers to decompose an image into).

    A family declares them as a subclass with Field constraints and defaults; a request passes them next to the
    sampling parameters (`OmniDiffusionSamplingParams(layers=4)`, `{"layers": 4}` over HTTP) and the family's
    adapter reads them from `PipelineInputs.extra`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class VideoKnobs(ModelKnobs):
    """The request parameters of every video family: how many frames, played at what rate. A family subclasses it
    to set its own defaults and `frame_step`."""

    frame_step: ClassVar[int] = 1
    """Valid frame counts are 1 + a multiple of this (the VAE's temporal compression: 4 for CogVideoX and Wan)."""

    num_frames: int = Field(default=17, ge=1, le=MAX_FRAMES, description="frames per video")
    fps: int = Field(default=8, ge=1, le=120, description="frames per second of the encoded video")

    @field_validator("num_frames")
    @classmethod
    def _valid_frame_count(cls, value: int) -> int:
        if (value - 1) % cls.frame_step:
            below = value - (value - 1) % cls.frame_step
            raise ValueError(
                f"num_frames must be 1 + a multiple of {cls.frame_step} for this model, e.g. {below} or "
                f"{below + cls.frame_step}, got {value}"
            )
        return value

    @classmethod
    def frames_for(cls, seconds: float, fps: int) -> int:
        """The valid frame count nearest to `seconds` of video at `fps` (at least one step of frames)."""
        return 1 + cls.frame_step * max(1, round(seconds * fps / cls.frame_step))


class ModelFamily:
    """Base class of a registry entry. Subclasses set the class attributes and override what differs."""

    architecture: ClassVar[str]
    """The `_class_name` in model_index.json that selects this family."""
    pipeline_class: ClassVar[str]
    """Name of the diffusers pipeline class that runs it."""
    task: ClassVar[Task] = "text-to-image"
    min_input_images: ClassVar[int] = 0
    max_input_images: ClassVar[int] = 0
    mask_pipeline_class: ClassVar[str | None] = None
    """Name of the diffusers pipeline that runs masked edits (inpainting) on the same components; None: no masks."""
    defaults: ClassVar[GenerationDefaults] = GenerationDefaults()
    knobs: ClassVar[type[ModelKnobs] | None] = None
    """The model-only request parameters this family takes, if any."""
    runs_batches: ClassVar[bool] = False
    """Whether `run_batch` runs text-to-image generations of several requests in one denoising loop."""

    @property
    def can_edit(self) -> bool:
        return self.max_input_images > 0

    @property
    def makes_video(self) -> bool:
        return self.task in VIDEO_TASKS

    @property
    def supports_mask(self) -> bool:
        return self.mask_pipeline_class is not None

    # -- loading -------------------------------------------------------------------------------
    def profile_defaults(self, overrides: dict[str, Any]) -> tuple[GenerationDefaults, dict[str, Any]]:
        """A model folder's "defaults" (teaserve.json) split into sampling defaults and model-knob defaults."""
        knob_names = [] if self.knobs is None else list(self.knobs.model_fields)
        names = [f.name for f in dataclasses.fields(GenerationDefaults)]
        unknown = set(overrides) - set(names) - set(knob_names)
        if unknown:
            raise ValueError(f"unknown default(s) {sorted(unknown)}; valid keys: {sorted(names + knob_names)}")
        knobs = {name: value for name, value in overrides.items() if name in knob_names}
        if self.knobs is not None:
            self.knobs.model_validate(knobs)
        sampling = {name: value for name, value in overrides.items() if name not in knob_names}
        return dataclasses.replace(self.defaults, **sampling), knobs

    def folder_defaults(self, folder: Path) -> dict[str, Any]:
        """Defaults of the checkpoint in `folder` where they differ between this family's checkpoints (e.g. a model
        version's frame count), keyed like teaserve.json's "defaults"; that file's own defaults go over them."""
        return {}

    def matches_folder(self, folder: Path) -> bool:
        """For checkpoints published without a model_index.json: True when `folder` is one of this family's."""
        return False

    def load(self, source: str | Path, device: torch.device, dtype: torch.dtype):
        import diffusers

        cls = getattr(diffusers, self.pipeline_class)
        pipe = cls.from_pretrained(str(source), dtype=dtype, **self.pretrained_kwargs(Path(source)))
        return pipe.to(device)

    def pretrained_kwargs(self, folder: Path) -> dict[str, Any]:
        """Extra `from_pretrained` arguments for the model in `folder` (components the family loads itself)."""
        return {}

    # -- sizes ---------------------------------------------------------------------------------
    def size_multiple(self, pipe) -> int:
        """Width and height must be multiples of this (VAE downsampling times the 2x2 latent packing)."""
        return pipe.vae_scale_factor * 2

    def check_size(self, pipe, width: int, height: int) -> None:
        """Raise a ValueError for an output size this model cannot make (the engine's limits come on top)."""
        multiple = self.size_multiple(pipe)
        if width % multiple or height % multiple:
            raise ValueError(
                f"width and height must each be a multiple of {multiple} for this model, got {width}x{height}"
            )

    def default_size(self, pipe) -> tuple[int, int]:
        side = pipe.default_sample_size * pipe.vae_scale_factor
        return side, side

    def fixed_output_size(
        self, pipe, images: list[Image.Image], knobs: dict[str, Any], masked: bool
    ) -> tuple[int, int] | None:
        """For pipelines that size their output themselves: that size (a request cannot choose one); else None."""
        return None

    def edit_size(self, pipe, image: Image.Image, max_pixels: int) -> tuple[int, int]:
        """The default output size of an edit: the input's size in multiples of the model's, scaled down to
        `max_pixels` when larger."""
        multiple = self.size_multiple(pipe)
        width, height = image.size
        rounded = (
            max(multiple, round(width / multiple) * multiple),
            max(multiple, round(height / multiple) * multiple),
        )
        if rounded[0] * rounded[1] <= max_pixels:
            return rounded
        scale = math.sqrt(max_pixels / (width * height))
        return (
            max(multiple, math.floor(width * scale / multiple) * multiple),
            max(multiple, math.floor(height * scale / multiple) * multiple),
        )

    def output_size(
        self,
        pipe,
        requested: tuple[int, int] | None,
        images: list[Image.Image],
        *,
        masked: bool,
        knobs: dict[str, Any],
        default: tuple[int, int],
        max_pixels: int,
    ) -> tuple[int, int]:
        """The size a request's images come out at: the pipeline's own when it decides, else the requested one,
        else (edits) the input's, else `default`. Raises a ValueError for a size the model cannot make."""
        fixed = self.fixed_output_size(pipe, images, knobs, masked) if images else None
        if fixed is not None:
            if requested is not None:
                when = " for masked edits" if masked else ""
                raise ValueError(f"{self.architecture} sizes its output from the input image{when}; omit size")
            return fixed
        if requested is not None:
            self.check_size(pipe, *requested)
            return requested
        if images and self.task == "image-edit":
            return self.edit_size(pipe, images[0], max_pixels)
        return default

    def check_knobs(self, pipe, knobs: dict[str, Any]) -> None:
        """Raise a KnobValueError for model-only parameters (valid for the family) that the loaded checkpoint cannot
        take."""

    def images_per_output(self, knobs: dict[str, Any]) -> int:
        """Images a pipeline call makes per requested output (the engine bounds their pixels per request): a video
        family's frames."""
        return int(knobs["num_frames"]) if self.makes_video else 1

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

    def output_images(
        self, pipe, output, inputs: PipelineInputs, final_latents: torch.Tensor | None
    ) -> list[Image.Image]:
        """The images of a pipeline call's output, flat, in order (`final_latents`: the last step's latents)."""
        return list(output.images)

    def output_videos(self, pipe, output, inputs: PipelineInputs) -> list[list[Image.Image]]:
        """A video family's frames of each output of a pipeline call, in order."""
        raise NotImplementedError

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        raise NotImplementedError

    def batch_rows(self, batch: list[PipelineInputs]) -> list[tuple[int, str]]:
        """(index in `batch`, CFG branch) of each row of `run_batch`'s transformer calls."""
        raise NotImplementedError

    def run_batch(self, pipe, batch: list[PipelineInputs], on_step_end: BatchStepCallback) -> list[list[Image.Image]]:
        """The images of each generation of `batch` (same size, steps and guidance; see `runs_batches`), made in one
        denoising loop whose transformer calls take every output and CFG branch as rows (`batch_rows`), under the
        cache context `ROWS_CONTEXT`. Each image equals, within float tolerance, the one its generation gets alone.
        `on_step_end` sees the latents of the outputs in `batch` order after every step."""
        raise NotImplementedError

    def encode_text(self, pipe, text: str) -> TextEmbedding | None:
        """`text` encoded by the pipeline's text encoder(s) for one image, as `call_kwargs` passes it back to the
        pipeline through `PipelineInputs.prompt_embedding`; the engine caches it. None: this family cannot encode
        a text alone (edit models that encode the prompt together with the input image, BAGEL)."""
        return None

    def text_encoder_key(self, pipe) -> tuple:
        """The settings that change what `encode_text` returns for a text (e.g. the maximum sequence length)."""
        return ()

    def mask_pipeline(self, pipe):
        """The pipeline that runs masked edits (inpainting) on `pipe`'s components (`mask_pipeline_class`)."""
        if self.mask_pipeline_class is None:
            raise ValueError(f"{self.architecture} has no pipeline for masked edits")
        import diffusers

        return getattr(diffusers, self.mask_pipeline_class).from_pipe(pipe)

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
