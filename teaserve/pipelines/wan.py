"""The Wan family: Wan2.1 / Wan2.2 text to video (WanPipeline) and image to video (WanImageToVideoPipeline)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from PIL import Image
from pydantic import Field

from ..cache import CacheTarget, StackShortcut, register_cache_target
from .base import MAX_FRAMES, GenerationDefaults, ModelFamily, PipelineInputs, Task, TextEmbedding, VideoKnobs
from .registry import register_family

DEFAULT_SIZE = (832, 480)
"""The pipelines' own default (Wan2.1's 480P), as width, height."""


class WanKnobs(VideoKnobs):
    """Wan's video parameters: 81 frames at 16 fps by default (about 5 seconds, as the model cards sample)."""

    frame_step = 4  # Wan's VAE compresses time 4x after the first frame

    num_frames: int = Field(default=81, ge=1, le=MAX_FRAMES, description="frames per video: 1 + a multiple of 4")
    fps: int = Field(default=16, ge=1, le=120, description="frames per second of the encoded video")


class Wan(ModelFamily):
    """Wan2.1 text to video, and Wan2.2's checkpoints laid out the same way (A14B: a second transformer,
    `transformer_2`, takes the low-noise steps). teaserve's `true_cfg_scale` is the pipeline's `guidance_scale`:
    above 1, with a negative prompt, each step calls the transformer for the prompt ("cond") and the negative prompt
    ("uncond"); `guidance_scale` (for guidance-distilled models) does not apply."""

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
        transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
        return pipe.vae_scale_factor_spatial * max(transformer.config.patch_size[1:])

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
        """The prompts as texts, or as the embeddings the engine encoded, one row per output either way (the
        image-to-video pipeline repeats its image embeddings per prompt row, not per video). The negative prompt
        only with CFG."""
        rows = inputs.num_outputs
        if inputs.prompt_embedding is None:
            negative = [inputs.negative_prompt] * rows if inputs.true_cfg else None
            return {"prompt": [inputs.prompt] * rows, "negative_prompt": negative, "num_videos_per_prompt": 1}
        kwargs: dict[str, Any] = {"prompt": None, "num_videos_per_prompt": 1}
        kwargs["prompt_embeds"] = _rows(inputs.prompt_embedding, rows)
        if inputs.true_cfg:
            assert inputs.negative_embedding is not None, "the negative prompt is encoded with the prompt"
            kwargs["negative_prompt_embeds"] = _rows(inputs.negative_embedding, rows)
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

    def decode_preview(self, pipe, latents, inputs):
        """The first frame of each video: Wan's VAE is causal in time, so the first latent frame alone decodes to
        it."""
        vae = pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
        first = (latents[:, :, :1] * std + mean).to(vae.dtype)
        frames = vae.decode(first, return_dict=False)[0]
        return [video[0] for video in pipe.video_processor.postprocess_video(frames, output_type="pil")]


class WanImageToVideo(Wan):
    """Wan image to video: the video starts from one input image. Wan2.1's checkpoints also encode the image with
    CLIP (`image_encoder`); Wan2.2's A14B does without. Without a requested size, the video has the input's aspect
    ratio at the default size's area."""

    architecture = "WanImageToVideoPipeline"
    pipeline_class = "WanImageToVideoPipeline"
    task: ClassVar[Task] = "image-to-video"
    min_input_images = 1
    max_input_images = 1
    # Wan's own sampling settings for image to video: 40 steps, guidance 5.0.
    defaults = GenerationDefaults(num_inference_steps=40, true_cfg_scale=5.0, negative_prompt="")

    def output_size(self, pipe, requested, images, *, masked, knobs, default, max_pixels):
        if requested is not None or not images:
            return super().output_size(
                pipe, requested, images, masked=masked, knobs=knobs, default=default, max_pixels=max_pixels
            )
        multiple = self.size_multiple(pipe)
        width, height = images[0].size
        scale = math.sqrt(default[0] * default[1] / (width * height))
        return (
            max(multiple, round(width * scale / multiple) * multiple),
            max(multiple, round(height * scale / multiple) * multiple),
        )

    def call_kwargs(self, pipe, inputs):
        return {**super().call_kwargs(pipe, inputs), "image": inputs.images[0]}


def _rows(embedding: TextEmbedding, rows: int) -> torch.Tensor:
    """`encode_text`'s embeddings with `rows` rows (a view: the cached tensor is shared, never copied or written)."""
    (embeds,) = embedding
    assert embeds is not None
    return embeds.expand(rows, -1, -1)


# -- caching ------------------------------------------------------------------------------------------------------
def wan_gate(block: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """What modulates every WanTransformerBlock: the timestep projection [B, 6, dim] the first block gets as `temb`
    (the original implementation's e0)."""
    return arguments["temb"]


def _time_embeddings(transformer, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(the timestep embedding [B, dim], its projection [B, 6, dim]) exactly as WanTransformer3DModel.forward
    computes them for one timestep per row, with `dtype` that of the text embeddings it is given."""
    embedder = transformer.condition_embedder
    sinusoids = embedder.timesteps_proj(timestep)
    time_dtype = next(iter(embedder.time_embedder.parameters())).dtype
    if sinusoids.dtype != time_dtype and time_dtype != torch.int8:
        sinusoids = sinusoids.to(time_dtype)
    embedding = embedder.time_embedder(sinusoids).to(dtype)
    return embedding, embedder.time_proj(embedder.act_fn(embedding)).unflatten(1, (6, -1))


def wan_timestep_gate(transformer, timestep: torch.Tensor) -> torch.Tensor | None:
    """`wan_gate` of a call with `timestep`: the pipelines give the transformer its text embeddings in its own
    dtype. None for Wan2.2 TI2V's per-token timesteps."""
    if timestep.ndim != 1:
        return None
    return _time_embeddings(transformer, timestep, transformer.dtype)[1]


def wan_enter(transformer, arguments: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """WanTransformer3DModel.forward up to its first block, without what only the blocks use (text and image
    embeddings, rotary embeddings); per-token timesteps (Wan2.2 TI2V) are left to the whole forward."""
    timestep = arguments["timestep"]
    if timestep.ndim != 1:
        return None
    hidden = transformer.patch_embedding(arguments["hidden_states"]).flatten(2).transpose(1, 2).contiguous()
    return hidden, _time_embeddings(transformer, timestep, arguments["encoder_hidden_states"].dtype)[1]


def wan_leave(transformer, hidden: torch.Tensor, temb: torch.Tensor, arguments: dict[str, Any]):
    """WanTransformer3DModel.forward after its last block: the output head (on the timestep embedding, which the
    blocks' `temb` is a projection of) and the unpatchifying."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    batch, _, frames, height, width = arguments["hidden_states"].shape
    p_t, p_h, p_w = transformer.config.patch_size
    embedding, _ = _time_embeddings(transformer, arguments["timestep"], arguments["encoder_hidden_states"].dtype)
    shift, scale = (transformer.scale_shift_table.to(embedding.device) + embedding.unsqueeze(1)).chunk(2, dim=1)
    hidden = (transformer.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = transformer.proj_out(hidden).reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    output = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
    return Transformer2DModelOutput(sample=output) if arguments.get("return_dict", True) else (output,)


# TeaCache4Wan2.1's coefficients for e0 (its `use_ret_steps` sets, highest power first), which it uses with the first
# 5 steps always computed. Its other sets were fitted on the timestep embedding before the projection, which no
# block sees.
WAN_T2V_1_3B_COEFFICIENTS = (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02)
WAN_T2V_14B_COEFFICIENTS = (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01)
WAN_I2V_480P_COEFFICIENTS = (2.57151496e05, -3.54229917e04, 1.40286849e03, -1.35890334e01, 1.32517977e-01)
WAN_I2V_720P_COEFFICIENTS = (8.10705460e03, 2.13393892e03, -3.72934672e02, 1.66203073e01, -4.17769401e-02)
WAN_RETENTION_STEPS = 5
WAN_TEXT_TO_VIDEO = {  # (layers, width) -> coefficients
    (30, 1536): WAN_T2V_1_3B_COEFFICIENTS,
    (40, 5120): WAN_T2V_14B_COEFFICIENTS,
}


def wan_coefficients(transformer) -> tuple[float, ...] | None:
    """The published coefficients of the checkpoint the transformer is, by its configuration: text to video 1.3B
    or 14B (Wan2.2's A14B experts are configured as the latter, and get its set); image to video 14B (with the
    CLIP image input), whose 480P and 720P checkpoints differ only in name: 720P where the folder's name says so.
    None for any other (e.g. Wan2.2 TI2V 5B, Wan2.2 I2V A14B)."""
    config = transformer.config
    shape = (config.num_layers, config.num_attention_heads * config.attention_head_dim)
    if config.in_channels == 16 and config.image_dim is None:
        return WAN_TEXT_TO_VIDEO.get(shape)
    if config.in_channels == 36 and config.image_dim is not None and shape == (40, 5120):
        name = str(config.get("_name_or_path", "")).lower()
        return WAN_I2V_720P_COEFFICIENTS if "720p" in name else WAN_I2V_480P_COEFFICIENTS
    return None


def wan_cache_defaults(transformer) -> dict[str, dict[str, Any]]:
    coefficients = wan_coefficients(transformer)
    if coefficients is None:
        return {}
    return {"tea_cache": {"coefficients": coefficients, "retention_steps": WAN_RETENTION_STEPS}}


register_cache_target(
    "diffusers.models.transformers.transformer_wan.WanTransformer3DModel",
    CacheTarget(
        blocks=lambda transformer: transformer.blocks,
        gate=wan_gate,
        timestep_gate=wan_timestep_gate,
        shortcut=StackShortcut(enter=wan_enter, leave=wan_leave),
        defaults=wan_cache_defaults,
    ),
)

register_family(Wan())
register_family(WanImageToVideo())
