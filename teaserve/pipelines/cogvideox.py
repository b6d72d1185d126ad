"""The CogVideoX family: CogVideoXPipeline (text to video) and CogVideoXImageToVideoPipeline (one image to video),
for the CogVideoX 1.0 (2b, 5b, 5b-I2V) and 1.5 (5B, 5B-I2V) checkpoints, and their TeaCache target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from pydantic import Field

from ..cache import CacheTarget, register_cache_target
from .base import (
    MAX_FRAMES,
    GenerationDefaults,
    KnobValueError,
    ModelFamily,
    PipelineInputs,
    Task,
    TextEmbedding,
    VideoKnobs,
)
from .registry import register_family

V15_FRAMES, V15_FPS = 81, 16
"""CogVideoX 1.5's videos as its model cards sample them: 5 seconds at 16 fps."""
V15_SIZE = (1360, 768)
"""CogVideoX 1.5's size as its model cards sample it (width, height); its sample size is only its largest."""


class CogVideoXKnobs(VideoKnobs):
    """CogVideoX's video parameters: 49 frames at 8 fps (6 seconds, as CogVideoX 1.0 was trained) by default;
    CogVideoX 1.5 folders default to 81 frames at 16 fps."""

    frame_step = 8
    """A video has 8N + 1 frames: an odd number of latent frames, the first decoded to one frame and each other to
    4. The VAE decodes an even number of latent frames to 4 frames each, so 4N + 1 frames with N odd would come out
    as 4N + 4."""

    num_frames: int = Field(default=49, ge=1, le=MAX_FRAMES, description="frames per video: 8N + 1 (1, 9, ..., 49)")
    fps: int = Field(default=8, ge=1, le=120, description="frames per second of the encoded video")


def checkpoint_name(config) -> str:
    """The published CogVideoX checkpoint a transformer config is laid out like: 1.5 has temporal patches, 5b
    rotary position embeddings where 2b has sinusoidal ones, and image-to-video models take the image's latents
    next to the video's (twice the channels in)."""
    image_to_video = config.in_channels == 2 * config.out_channels
    if config.patch_size_t is not None:
        return "CogVideoX1.5-5B-I2V" if image_to_video else "CogVideoX1.5-5B"
    if not config.use_rotary_positional_embeddings:
        return "CogVideoX-2b"
    return "CogVideoX-5b-I2V" if image_to_video else "CogVideoX-5b"


def uses_dynamic_cfg(pipe) -> bool:
    """CogVideo's reference sampling raises the guidance scale over the steps with its DPM scheduler and keeps it
    fixed with DDIM: the scheduler the checkpoint ships decides."""
    from diffusers import CogVideoXDPMScheduler

    return isinstance(pipe.scheduler, CogVideoXDPMScheduler)


class CogVideoX(ModelFamily):
    """CogVideoX text to video. teaserve's `true_cfg_scale` is the pipeline's `guidance_scale`: above 1, with a
    negative prompt (blank by default), each step calls the transformer once for the prompt and the negative prompt
    together, as two rows under the cache context "cond_uncond", so a cache decides once per step for both.

    What a checkpoint can make follows from its transformer: widths and heights in multiples of 16 (VAE x patch);
    5b-I2V's positional embeddings are learned for its sample size and 49 frames, so it makes exactly that (for
    other frame counts diffusers replaces them with sinusoidal ones it was never trained with); 1.5's rotary
    position table ends at its sample size."""

    architecture = "CogVideoXPipeline"
    pipeline_class = "CogVideoXPipeline"
    task: ClassVar[Task] = "text-to-video"
    knobs = CogVideoXKnobs
    # The model cards sample with 50 steps and guidance 6; the pipeline encodes a missing negative prompt as blank.
    defaults = GenerationDefaults(num_inference_steps=50, true_cfg_scale=6.0, negative_prompt="")

    def folder_defaults(self, folder: Path) -> dict[str, Any]:
        """CogVideoX 1.5 (a transformer with temporal patches) makes 81 frames at 16 fps by default."""
        config = folder / "transformer" / "config.json"
        if config.is_file() and json.loads(config.read_text()).get("patch_size_t") is not None:
            return {"num_frames": V15_FRAMES, "fps": V15_FPS}
        return {}

    # -- sizes ---------------------------------------------------------------------------------
    def size_multiple(self, pipe) -> int:
        """The VAE's spatial downsampling times the transformer's patch."""
        return pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size

    def sample_size(self, pipe) -> tuple[int, int]:
        """The transformer's sample size in pixels, (width, height)."""
        config = pipe.transformer.config
        return config.sample_width * pipe.vae_scale_factor_spatial, config.sample_height * pipe.vae_scale_factor_spatial

    def default_size(self, pipe) -> tuple[int, int]:
        width, height = self.sample_size(pipe)
        if pipe.transformer.config.patch_size_t is None:
            return width, height  # 720x480
        return min(V15_SIZE[0], width), min(V15_SIZE[1], height)

    def check_size(self, pipe, width: int, height: int) -> None:
        super().check_size(pipe, width, height)
        config = pipe.transformer.config
        sample_width, sample_height = self.sample_size(pipe)
        if config.use_learned_positional_embeddings and (width, height) != (sample_width, sample_height):
            raise ValueError(
                f"this checkpoint makes only {sample_width}x{sample_height} videos (its positional embeddings are "
                f"learned for that size), got {width}x{height}"
            )
        if config.patch_size_t is not None and (width > sample_width or height > sample_height):
            raise ValueError(
                f"this checkpoint makes videos of at most {sample_width}x{sample_height} (its rotary position table "
                f"ends there), got {width}x{height}"
            )

    def check_knobs(self, pipe, knobs: dict[str, Any]) -> None:
        config, num_frames = pipe.transformer.config, knobs["num_frames"]
        if config.use_learned_positional_embeddings and num_frames != config.sample_frames:
            raise KnobValueError(
                "num_frames",
                f"num_frames must be {config.sample_frames} for this checkpoint: its positional embeddings are learned "
                f"for {config.sample_frames} frames, and for other counts diffusers replaces them with sinusoidal "
                f"ones it was not trained with; got {num_frames}",
            )

    def image_size(self, pipe, image: Image.Image, default: tuple[int, int]) -> tuple[int, int]:
        """The size of a video made from `image` without a requested size. The pipeline stretches the image to the
        video's size, so the video keeps the image's aspect ratio where the checkpoint can: the default size's
        short side, the long side up to the default's long side (CogVideoX1.5-5B-I2V's model card: short side 768,
        long side 768 to 1360)."""
        if pipe.transformer.config.use_learned_positional_embeddings:
            return default
        multiple = self.size_multiple(pipe)
        short, longest = min(default), max(default)
        ratio = max(image.size) / min(image.size)
        long = min(longest, max(short, round(short * ratio / multiple) * multiple))
        return (long, short) if image.width >= image.height else (short, long)

    def output_size(self, pipe, requested, images, *, masked, knobs, default, max_pixels):
        size = requested or (self.image_size(pipe, images[0], default) if images else default)
        self.check_size(pipe, *size)  # also a default size from the model folder's teaserve.json
        return size

    # -- running -------------------------------------------------------------------------------
    @staticmethod
    def max_sequence_length(pipe) -> int:
        """T5 tokens every prompt is padded or cut to: the transformer's text length (2b's sinusoidal position
        table is laid out for exactly that many)."""
        return pipe.transformer.config.max_text_seq_length

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        return {
            **self.prompt_kwargs(inputs),
            # CogVideoX runs CFG exactly when its guidance scale is above 1.
            "guidance_scale": inputs.true_cfg_scale if inputs.true_cfg else 1.0,
            "use_dynamic_cfg": uses_dynamic_cfg(pipe),
            "width": inputs.width,
            "height": inputs.height,
            "num_frames": inputs.extra["num_frames"],
            "num_inference_steps": inputs.num_inference_steps,
            "max_sequence_length": self.max_sequence_length(pipe),
            "generator": inputs.generators,
            "output_type": "pil",
        }

    @staticmethod
    def prompt_kwargs(inputs: PipelineInputs) -> dict[str, Any]:
        """The prompts as texts, or as the embeddings the engine encoded, one row per output either way (the
        pipelines make one video per prompt row). The negative prompt only with CFG."""
        rows = inputs.num_outputs
        if inputs.prompt_embedding is None:
            negative = [inputs.negative_prompt] * rows if inputs.true_cfg else None
            return {"prompt": [inputs.prompt] * rows, "negative_prompt": negative}
        kwargs: dict[str, Any] = {"prompt": None, "prompt_embeds": _rows(inputs.prompt_embedding, rows)}
        if inputs.true_cfg:
            assert inputs.negative_embedding is not None, "the negative prompt is encoded with the prompt"
            kwargs["negative_prompt_embeds"] = _rows(inputs.negative_embedding, rows)
        return kwargs

    def encode_text(self, pipe, text: str) -> TextEmbedding | None:
        """(prompt_embeds [1, max_sequence_length, dim] from T5)."""
        embeds, _ = pipe.encode_prompt(
            text,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length(pipe),
            device=pipe._execution_device,
        )
        return (embeds,)

    def text_encoder_key(self, pipe) -> tuple:
        return (self.max_sequence_length(pipe),)

    def output_videos(self, pipe, output, inputs: PipelineInputs) -> list[list[Image.Image]]:
        return [list(frames) for frames in output.frames]

    def decode_preview(self, pipe, latents, inputs):
        """The first frame of each video: the VAE decodes the first latent frame alone to it. CogVideoX 1.5 pads
        the latent frames in front to a multiple of its temporal patch; the padding is passed over."""
        video_frames = (inputs.extra["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
        padding = latents.shape[1] - video_frames  # latents: [batch, frames, channels, height, width]
        frames = pipe.decode_latents(latents[:, padding : padding + 1])
        return [video[0] for video in pipe.video_processor.postprocess_video(frames, output_type="pil")]


class CogVideoXImageToVideo(CogVideoX):
    """CogVideoX image to video: the video starts from one input image."""

    architecture = "CogVideoXImageToVideoPipeline"
    pipeline_class = "CogVideoXImageToVideoPipeline"
    task: ClassVar[Task] = "image-to-video"
    min_input_images = 1
    max_input_images = 1

    def call_kwargs(self, pipe, inputs):
        return {**super().call_kwargs(pipe, inputs), "image": [inputs.images[0]] * inputs.num_outputs}


def _rows(embedding: TextEmbedding, rows: int) -> torch.Tensor:
    """`encode_text`'s embeddings with `rows` rows (a view: the cached tensor is shared, never copied or written)."""
    (embeds,) = embedding
    assert embeds is not None
    return embeds.expand(rows, -1, -1)


def cogvideox_gate(block: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """The time embedding every block is modulated with (block 0's `temb`; with CogVideoX1.5-I2V's ofs embedding
    added): TeaCache4CogVideoX gates on it, and its coefficients were fitted on it."""
    return arguments["temb"]


def cogvideox_timestep_gate(transformer, timestep: torch.Tensor) -> torch.Tensor | None:
    """`cogvideox_gate` of a call with `timestep`, computed as the forward computes it; None for CogVideoX1.5-I2V,
    whose gate adds the embedding of another argument (ofs)."""
    if transformer.ofs_embedding is not None:
        return None
    return transformer.time_embedding(transformer.time_proj(timestep).to(dtype=transformer.dtype), None)


# TeaCache4CogVideoX1.5's coefficients (ali-vilab/TeaCache), by the checkpoint they were fitted on.
TEACACHE_COEFFICIENTS = {
    "CogVideoX-2b": (-3.10658903e01, 2.54732368e01, -5.92380459e00, 1.75769064e00, -3.61568434e-03),
    "CogVideoX-5b": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
    "CogVideoX-5b-I2V": (-1.53880483e03, 8.43202495e02, -1.34363087e02, 7.97131516e00, -5.23162339e-02),
    "CogVideoX1.5-5B": (2.50210439e02, -1.65061612e02, 3.57804877e01, -7.81551492e-01, 3.58559703e-02),
    "CogVideoX1.5-5B-I2V": (1.22842302e02, -1.04088754e02, 2.62981677e01, -3.06009921e-01, 3.71213220e-02),
}


def cogvideox_cache_defaults(transformer) -> dict[str, dict[str, Any]]:
    return {"tea_cache": {"coefficients": TEACACHE_COEFFICIENTS[checkpoint_name(transformer.config)]}}


register_cache_target(
    "diffusers.models.transformers.cogvideox_transformer_3d.CogVideoXTransformer3DModel",
    CacheTarget(
        blocks=lambda transformer: transformer.transformer_blocks,
        gate=cogvideox_gate,
        defaults=cogvideox_cache_defaults,
        timestep_gate=cogvideox_timestep_gate,
    ),
)

register_family(CogVideoX())
register_family(CogVideoXImageToVideo())
