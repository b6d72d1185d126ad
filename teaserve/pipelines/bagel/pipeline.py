"""BAGEL image generation and editing: contexts, the flow-matching sampler, CFG on text and image, decoding.

One request builds up to three contexts (KV caches), one per CFG branch, exactly as the reference inferencer:

| task | "cond" (full)                 | "uncond_text" (text dropped)      | "uncond_image" (image dropped) |
|------|-------------------------------|-----------------------------------|--------------------------------|
| T2I  | text                          | empty (or the negative prompt)    | = cond, so it is not computed  |
| edit | VAE image, ViT image, text    | VAE image, ViT image (or + neg.)  | text                           |

A text block is `<|im_start|> tokens <|im_end|>` (no chat template). Then every step evaluates the branches
(each inside its own `transformer.cache_context`, so TeaCache keeps one state per branch), combines them
with CFG and renormalisation *after* the forwards, and takes an Euler step x <- x - v * dt on a shifted
schedule. The engine's `num_inference_steps` counts those steps (model evaluations per branch): the
reference `num_timesteps=50` schedule has 49, which is why 49 is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .autoencoder import FluxAutoencoder
from .config import BagelConfig
from .llm import KVContext
from .model import BagelModel
from .packing import patchify, unpatchify

RenormType = Literal["global", "channel", "text_channel"]
RENORM_TYPES = ("global", "channel", "text_channel")

# The reference image transforms: (longest side, shortest side) for the VAE (stride 16) and the ViT (stride
# 14), both with an area cap. Models with smaller position tables scale them down with their largest side.
VAE_SIDES = (1024, 512)
VIT_SIDES = (980, 224)
REFERENCE_MAX_PIXELS = 14 * 14 * 9 * 1024


@dataclass(frozen=True)
class ImageResize:
    """BAGEL's resize: longest side at most `max_side`, shortest at least `min_side` (the minimum wins), then
    the area cap and the longest side enforced again; both sides multiples of `stride` (bicubic)."""

    max_side: int
    min_side: int
    stride: int
    max_pixels: int

    @classmethod
    def scaled(cls, reference: tuple[int, int], max_side: int, stride: int) -> ImageResize:
        reference_max, reference_min = reference
        min_side = max(stride, round(reference_min * max_side / reference_max / stride) * stride)
        return cls(max_side, min_side, stride, round(REFERENCE_MAX_PIXELS * (max_side / reference_max) ** 2))

    def _fit(self, width: float, height: float, scale: float) -> tuple[int, int]:
        def side(length: float) -> int:
            return max(self.stride, round(round(length * scale) / self.stride) * self.stride)

        return side(width), side(height)

    def size(self, width: int, height: int) -> tuple[int, int]:
        scale = max(min(self.max_side / max(width, height), 1.0), self.min_side / min(width, height))
        width, height = self._fit(width, height, scale)
        if width * height > self.max_pixels:
            # The reference scales both sides by the area ratio itself (not its square root); kept as is.
            width, height = self._fit(width, height, self.max_pixels / (width * height))
        if max(width, height) > self.max_side:
            width, height = self._fit(width, height, self.max_side / max(width, height))
        return width, height

    def __call__(self, image: Image.Image) -> Image.Image:
        size = self.size(*image.size)
        return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> [3, H, W] in [-1, 1]."""
    array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return array.permute(2, 0, 1) * 2.0 - 1.0


class BagelFlowSchedule:
    """The shifted flow-matching schedule of one generation; `sigmas` also feeds the engine's previews.

    sigmas: num_steps + 1 flow times from 1 to 0, s -> shift * s / (1 + (shift - 1) * s) on a uniform grid.
    Step i evaluates the model at sigmas[i] and moves the latents to sigmas[i + 1].
    """

    sigmas: torch.Tensor | None = None

    def set_timesteps(self, num_steps: int, shift: float) -> torch.Tensor:
        """Set and return the sigmas of a generation of `num_steps` steps."""
        # float32 throughout, like the reference, so that the CFG-interval tests on t agree to the last bit.
        uniform = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32)
        self.sigmas = sigmas = shift * uniform / (1 + (shift - 1) * uniform)
        return sigmas


def combine_cfg(
    v_full: torch.Tensor,
    v_text_free: torch.Tensor | None,
    v_image_free: torch.Tensor | None,
    *,
    text_scale: float,
    image_scale: float,
    renorm_type: RenormType,
    renorm_min: float,
) -> torch.Tensor:
    """BAGEL's CFG on velocities [batch, tokens, channels]; a branch that was not run is None.

    Text guidance first, then image guidance on top of it. The result is rescaled so that its norm never
    exceeds the full branch's (renorm only ever shrinks; `renorm_min` bounds the factor): "global" over each
    image, "channel" per token, "text_channel" per token on the text-guided velocity only, before image
    guidance. With no guidance the full branch's velocity is returned as is.
    """
    if v_text_free is None and v_image_free is None:
        return v_full

    def ratio(reference: torch.Tensor, guided: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        reference_norm = torch.linalg.vector_norm(reference, dim=dims, keepdim=True)
        guided_norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
        return (reference_norm / (guided_norm + 1e-8)).clamp(min=renorm_min, max=1.0)

    guided = v_full if v_text_free is None else v_text_free + text_scale * (v_full - v_text_free)
    if renorm_type == "text_channel":
        if v_text_free is not None:
            guided = guided * ratio(v_full, guided, (-1,))
        return guided if v_image_free is None else v_image_free + image_scale * (guided - v_image_free)
    if v_image_free is not None:
        guided = v_image_free + image_scale * (guided - v_image_free)
    return guided * ratio(v_full, guided, (1, 2) if renorm_type == "global" else (-1,))


@dataclass(frozen=True)
class SamplingSettings:
    """BAGEL's sampler and guidance settings; the defaults are the reference notebook's for text to image.

    `for_task(editing=True)` gives its settings for edits instead (cfg_img_scale 2.0, CFG at every step,
    "text_channel" renorm). CFG runs at steps whose flow time t has lo < t <= hi of `cfg_interval`: text
    guidance when cfg_text_scale > 1, image guidance when cfg_img_scale > 1, each on its own.
    """

    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_type: RenormType = "global"
    cfg_renorm_min: float = 0.0
    timestep_shift: float = 3.0

    def __post_init__(self) -> None:
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {', '.join(RENORM_TYPES)}, got {self.cfg_renorm_type!r}")

    @classmethod
    def for_task(cls, *, editing: bool, **settings: Any) -> SamplingSettings:
        """The task's default settings with `settings` over them (a setting given as None keeps the default)."""
        chosen = {name: value for name, value in settings.items() if value is not None}
        return cls(**{**(EDIT_SETTINGS if editing else {}), **chosen})

    def guides_at(self, t: float) -> bool:
        low, high = self.cfg_interval
        return low < t <= high


EDIT_SETTINGS: dict[str, Any] = {"cfg_img_scale": 2.0, "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "text_channel"}


@dataclass
class BagelPipelineOutput:
    images: list[Image.Image]


StepCallback = Callable[[Any, int, float, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class BagelPipeline:
    """Text (and optionally one input image) to image with BAGEL; runs wherever `transformer` lives."""

    def __init__(self, transformer: BagelModel, vae: FluxAutoencoder, tokenizer):
        self.transformer = transformer
        self.vae = vae
        self.tokenizer = tokenizer
        self.scheduler = BagelFlowSchedule()
        self._progress_bar_config: dict[str, Any] = {}
        special_tokens = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
        ids = tokenizer.convert_tokens_to_ids(special_tokens)
        if None in ids or tokenizer.unk_token_id in ids:
            raise ValueError(f"BAGEL's tokenizer must have the special tokens {special_tokens}")
        self.text_start_id, self.text_end_id = ids[:2]
        self.image_markers = torch.tensor(ids[2:], device=transformer.device)
        config = self.config
        self.vae_resize = ImageResize.scaled(VAE_SIDES, config.max_image_side, config.latent_downsample)
        vit_patch = config.vit.patch_size
        self.vit_resize = ImageResize.scaled(VIT_SIDES, config.vit_max_num_patch_per_side * vit_patch, vit_patch)

    @property
    def config(self) -> BagelConfig:
        return self.transformer.config

    @property
    def size_multiple(self) -> int:
        return self.config.latent_downsample

    def set_progress_bar_config(self, **kwargs) -> None:
        self._progress_bar_config = kwargs

    def text_block(self, text: str) -> list[int]:
        return [self.text_start_id, *self.tokenizer.encode(text, add_special_tokens=False), self.text_end_id]

    def check_size(self, width: int, height: int) -> None:
        multiple, largest = self.size_multiple, self.config.max_image_side
        if width % multiple or height % multiple or not (0 < width <= largest and 0 < height <= largest):
            raise ValueError(
                f"BAGEL generates sides that are multiples of {multiple} up to {largest} px (its latent position "
                f"table is {self.config.max_latent_size} tokens wide); got {width}x{height}"
            )

    # -- contexts ----------------------------------------------------------------------------------------------
    def build_contexts(
        self, prompt: str, image: Image.Image | None, negative_prompt: str | None, generators: list[torch.Generator]
    ) -> dict[str, KVContext | None]:
        """The three branch contexts; "uncond_image" is None when it equals "cond" (no input image)."""
        model = self.transformer
        cond = model.new_context()
        if image is not None:
            # The input image joins as clean VAE latents (one posterior sample per output image), then ViT tokens.
            resized = self.vae_resize(image)
            pixels = to_tensor(resized)
            latents = self.vae.encode(pixels[None].to(model.device, self.vae_dtype), generators)
            downsample = self.config.latent_downsample
            grid = (pixels.shape[1] // downsample, pixels.shape[2] // downsample)
            model.prefill_vae_image(cond, patchify(latents, self.config.latent_patch_size), grid, self.image_markers)
            model.prefill_vit_image(cond, to_tensor(self.vit_resize(resized)), self.image_markers)
        text_free = cond.copy()
        if negative_prompt is not None:
            model.prefill_text(text_free, self.text_block(negative_prompt))
        image_free = None
        if image is not None:
            image_free = model.new_context()
            model.prefill_text(image_free, self.text_block(prompt))
        model.prefill_text(cond, self.text_block(prompt))
        return {"cond": cond, "uncond_text": text_free, "uncond_image": image_free}

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.vae.decoder.conv_in.weight.dtype

    def edit_size(self, image: Image.Image) -> tuple[int, int]:
        """The output size of an edit: the input image's size after BAGEL's VAE resize."""
        return self.vae_resize.size(*image.size)

    # -- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        *,
        image: Image.Image | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        num_inference_steps: int = 49,
        sampling: SamplingSettings | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        callback_on_step_end: StepCallback | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] | list[str] = ("latents",),
    ) -> BagelPipelineOutput:
        """Generate `num_images_per_prompt` images (one generator each: noise is drawn on the CPU from it).

        `sampling` defaults to `SamplingSettings.for_task(editing=image is not None)`. An edit's size defaults
        to the resized input's, a generated image's to the largest the model makes.
        `callback_on_step_end(pipe, step, t, {"latents": latents})` runs after every step and may replace the
        latents (the only tensor input offered, whatever `callback_on_step_end_tensor_inputs` asks for); an
        exception from it cancels the generation.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        settings = sampling or SamplingSettings.for_task(editing=image is not None)
        generators = self._generators(generator, num_images_per_prompt)
        width, height = self.output_size(image, width, height)
        # The order of the draws matters for reproducibility: an input image's VAE noise, then the initial noise.
        contexts = self.build_contexts(prompt, image, negative_prompt, generators)
        grid = (height // self.size_multiple, width // self.size_multiple)
        latents = self.initial_noise(generators, grid)
        latents = self.denoise(latents, contexts, grid, num_inference_steps, settings, callback_on_step_end)
        return BagelPipelineOutput(images=self.decode(latents, width, height))

    def output_size(self, image: Image.Image | None, width: int | None, height: int | None) -> tuple[int, int]:
        if width is None or height is None:
            largest = self.config.max_image_side
            width, height = (largest, largest) if image is None else self.edit_size(image)
        self.check_size(width, height)
        return width, height

    def initial_noise(self, generators: list[torch.Generator], grid: tuple[int, int]) -> torch.Tensor:
        """Patchified noise [images, rows * columns, patch_latent_dim], drawn on the CPU like the reference's."""
        shape = (grid[0] * grid[1], self.config.patch_latent_dim)
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.transformer.device)

    def denoise(
        self,
        latents: torch.Tensor,
        contexts: dict[str, KVContext | None],
        grid: tuple[int, int],
        num_steps: int,
        settings: SamplingSettings,
        callback_on_step_end: StepCallback | None = None,
    ) -> torch.Tensor:
        """Euler steps x <- x - v * dt from t = 1 to t = 0 on the shifted schedule; returns the final latents."""
        sigmas = self.scheduler.set_timesteps(num_steps, settings.timestep_shift).tolist()
        try:
            with tqdm(total=num_steps, **self._progress_bar_config) as progress:
                for step in range(num_steps):
                    t = sigmas[step]
                    velocity = self.guided_velocity(latents, t, contexts, grid, settings)
                    latents = latents - velocity * (t - sigmas[step + 1])
                    if callback_on_step_end is not None:
                        latents = callback_on_step_end(self, step, t, {"latents": latents}).get("latents", latents)
                    progress.update()
        finally:
            self.transformer._reset_stateful_cache()  # drop TeaCache's per-branch residuals of this request
        return latents

    def guided_velocity(
        self,
        latents: torch.Tensor,
        t: float,
        contexts: dict[str, KVContext | None],
        grid: tuple[int, int],
        settings: SamplingSettings,
    ) -> torch.Tensor:
        """One step's velocity: the branches the step needs (each in its own cache context), combined by CFG."""
        model = self.transformer

        def velocity(branch: str) -> torch.Tensor:
            with model.cache_context(branch):
                return model(latents, t, context=contexts[branch], grid=grid, markers=self.image_markers)

        guided = settings.guides_at(t)
        v_full = velocity("cond")
        v_text_free = velocity("uncond_text") if guided and settings.cfg_text_scale > 1 else None
        v_image_free = None
        if guided and settings.cfg_img_scale > 1:
            v_image_free = v_full if contexts["uncond_image"] is None else velocity("uncond_image")
        return combine_cfg(
            v_full,
            v_text_free,
            v_image_free,
            text_scale=settings.cfg_text_scale,
            image_scale=settings.cfg_img_scale,
            renorm_type=settings.cfg_renorm_type,
            renorm_min=settings.cfg_renorm_min,
        )

    @staticmethod
    def _generators(generator, count: int) -> list[torch.Generator]:
        if generator is None:
            return [torch.Generator("cpu").manual_seed(int(torch.randint(2**31, ()))) for _ in range(count)]
        generators = generator if isinstance(generator, list) else [generator]
        if len(generators) != count:
            raise ValueError(f"got {len(generators)} generators for {count} images; pass one per image")
        return generators

    def decode(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        """Patchified latents [batch, tokens, patch_latent_dim] -> PIL images."""
        p, multiple = self.config.latent_patch_size, self.size_multiple
        z = unpatchify(latents.float(), height // multiple, width // multiple, p)
        pixels = self.vae.decode(z.to(self.vae_dtype))
        pixels = ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return [Image.fromarray(array) for array in pixels.permute(0, 2, 3, 1).cpu().numpy()]
