"""The Wan family: Wan2.1 / Wan2.2 text to video (WanPipeline)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image
from pydantic import Field, field_validator

from .base import MAX_FRAMES, GenerationDefaults, ModelFamily, PipelineInputs, Task, TextEmbedding, VideoKnobs
from .registry import register_family

DEFAULT_SIZE = (832, 480)
"""The pipelines' own default (Wan2.1's 480P), as width, height."""
FRAME_STEP = 4
"""Wan's VAE compresses time 4x after the first frame: a video has 4k + 1 frames."""


class WanKnobs(VideoKnobs):
    """Wan's video parameters: 81 frames at 16 fps by default (about 5 seconds, as the model cards sample)."""

    num_frames: int = Field(
        default=81, ge=1, le=MAX_FRAMES, description=f"frames per video: 1 more than a multiple of {FRAME_STEP}"
    )
    fps: int = Field(default=16, ge=1, le=120, description="frames per second of the encoded video")

    @field_validator("num_frames")
    @classmethod
    def check_frames(cls, value: int) -> int:
        if (value - 1) % FRAME_STEP == 0:
            return value
        below = (value - 1) // FRAME_STEP * FRAME_STEP + 1
        nearest = [count for count in (below, below + FRAME_STEP) if count <= MAX_FRAMES]
        raise ValueError(
            f"num_frames must be 1 more than a multiple of {FRAME_STEP} (Wan's VAE compresses time {FRAME_STEP}x), "
            f"got {value}; nearest valid values: {' or '.join(map(str, nearest))}"
        )


class Wan(ModelFamily):
    """Wan2.1 text to video (and Wan2.2's checkpoints laid out the same way). teaserve's `true_cfg_scale` is the
    pipeline's `guidance_scale`: above 1, with a negative prompt, each step calls the transformer for the prompt
    ("cond") and the negative prompt ("uncond"); `guidance_scale` (for guidance-distilled models) does not apply."""

    architecture = "WanPipeline"
    pipeline_class = "WanPipeline"
    task: ClassVar[Task] = "text-to-video"
    knobs = WanKnobs
    # The model cards: 50 steps, guidance 5.0; diffusers' pipeline encodes a missing negative prompt as blank.
    defaults = GenerationDefaults(num_inference_steps=50, true_cfg_scale=5.0, negative_prompt="")
    max_sequence_length: ClassVar[int] = 512
    """T5 tokens every prompt is padded or cut to (the pipelines' own default)."""

    def size_multiple(self, pipe) -> int:
        """The VAE's spatial downsampling times the transformer's patch."""
        return pipe.vae_scale_factor_spatial * max(pipe.transformer.config.patch_size[1:])

    def default_size(self, pipe) -> tuple[int, int]:
        return DEFAULT_SIZE

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        return {
            **self.prompt_kwargs(inputs),
            # Wan's CFG runs exactly when its guidance scale is above 1.
            "guidance_scale": inputs.true_cfg_scale if inputs.true_cfg else 1.0,
            "width": inputs.width,
            "height": inputs.height,
            "num_frames": inputs.extra["num_frames"],
            "num_inference_steps": inputs.num_inference_steps,
            "max_sequence_length": self.max_sequence_length,
            "generator": inputs.generators,
            "output_type": "pil",
        }

    @staticmethod
    def prompt_kwargs(inputs: PipelineInputs) -> dict[str, Any]:
        """The prompts as texts, or as the embeddings the engine encoded (one row per output: given embeddings are
        taken as they are). The negative prompt only with CFG."""
        if inputs.prompt_embedding is None:
            return {
                "prompt": inputs.prompt,
                "negative_prompt": inputs.negative_prompt if inputs.true_cfg else None,
                "num_videos_per_prompt": inputs.num_outputs,
            }
        kwargs: dict[str, Any] = {"prompt": None, "num_videos_per_prompt": 1}
        kwargs["prompt_embeds"] = _rows(inputs.prompt_embedding, inputs.num_outputs)
        if inputs.true_cfg:
            assert inputs.negative_embedding is not None, "the negative prompt is encoded with the prompt"
            kwargs["negative_prompt_embeds"] = _rows(inputs.negative_embedding, inputs.num_outputs)
        return kwargs

    def encode_text(self, pipe, text: str) -> TextEmbedding | None:
        """(prompt_embeds [1, max_sequence_length, dim] from T5, zero past the text's tokens)."""
        embeds = pipe._get_t5_prompt_embeds(
            text, max_sequence_length=self.max_sequence_length, device=pipe._execution_device
        )
        return (embeds,)

    def text_encoder_key(self, pipe) -> tuple:
        return (self.max_sequence_length,)

    def output_videos(self, pipe, output, inputs: PipelineInputs) -> list[list[Image.Image]]:
        return [list(frames) for frames in output.frames]


def _rows(embedding: TextEmbedding, rows: int) -> torch.Tensor:
    """`encode_text`'s embeddings with `rows` rows (a view: the cached tensor is shared, never copied or written)."""
    (embeds,) = embedding
    assert embeds is not None
    return embeds.expand(rows, -1, -1)


register_family(Wan())
