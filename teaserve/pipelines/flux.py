"""The Flux family: FluxPipeline (text to image) and FluxKontextPipeline (edit with one input image)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from ..cache import CacheTarget, register_cache_target
from .base import GenerationDefaults, ModelFamily, PipelineInputs, TextEmbedding
from .registry import register_family


def _embedding_kwargs(prefix: str, embedding: TextEmbedding, rows: int) -> dict[str, torch.Tensor]:
    """`encode_text`'s embeddings as `prefix`prompt_embeds and `prefix`pooled_prompt_embeds, `rows` rows each
    (views: the cached tensors are shared, never copied or written)."""
    embeds, pooled = embedding
    assert embeds is not None and pooled is not None
    return {
        f"{prefix}prompt_embeds": embeds.expand(rows, -1, -1),
        f"{prefix}pooled_prompt_embeds": pooled.expand(rows, -1),
    }


class Flux(ModelFamily):
    """FLUX.1 [dev]-style models: guidance-distilled (`guidance_scale` is an input of the transformer), optional
    true CFG when a negative prompt comes with `true_cfg_scale` > 1."""

    architecture = "FluxPipeline"
    pipeline_class = "FluxPipeline"
    defaults = GenerationDefaults(num_inference_steps=28, guidance_scale=3.5, true_cfg_scale=1.0)
    max_sequence_length: ClassVar[int] = 512
    """T5 tokens every prompt is padded or cut to (the pipelines' own default)."""

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        return {
            **self.prompt_kwargs(inputs),
            "true_cfg_scale": inputs.true_cfg_scale,
            "guidance_scale": inputs.guidance_scale,
            "width": inputs.width,
            "height": inputs.height,
            "num_inference_steps": inputs.num_inference_steps,
            "max_sequence_length": self.max_sequence_length,
            "generator": inputs.generators,
            "output_type": "pil",
        }

    @staticmethod
    def prompt_kwargs(inputs: PipelineInputs) -> dict[str, Any]:
        """The prompts as texts, or as the embeddings the engine encoded. The pipelines repeat a text's embeddings
        for each image but take given embeddings as they are: those come expanded to one row per image, as a batch
        of prompts with one image each. The negative prompt only with true CFG."""
        if inputs.prompt_embedding is None:
            return {
                "prompt": inputs.prompt,
                "negative_prompt": inputs.negative_prompt if inputs.true_cfg else None,
                "num_images_per_prompt": inputs.num_outputs,
            }
        kwargs: dict[str, Any] = {"prompt": None, "num_images_per_prompt": 1}
        kwargs.update(_embedding_kwargs("", inputs.prompt_embedding, inputs.num_outputs))
        if inputs.true_cfg:
            assert inputs.negative_embedding is not None, "the negative prompt is encoded with the prompt"
            kwargs.update(_embedding_kwargs("negative_", inputs.negative_embedding, inputs.num_outputs))
        return kwargs

    def encode_text(self, pipe, text: str) -> TextEmbedding | None:
        """(prompt_embeds [1, max_sequence_length, dim] from T5, pooled_prompt_embeds [1, dim] from CLIP)."""
        prompt_embeds, pooled_prompt_embeds, _ = pipe.encode_prompt(
            text,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return prompt_embeds, pooled_prompt_embeds

    def text_encoder_key(self, pipe) -> tuple:
        return (self.max_sequence_length,)

    def decode_preview(self, pipe, latents, inputs):
        latents = pipe._unpack_latents(latents, inputs.height, inputs.width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")


class FluxKontext(Flux):
    """FLUX.1 Kontext: edits one input image, which it first resizes to the resolution it was trained at nearest to
    the image's aspect ratio; the output has the requested size (default: the input's, rounded)."""

    architecture = "FluxKontextPipeline"
    pipeline_class = "FluxKontextPipeline"
    task = "image-edit"
    min_input_images = 1
    max_input_images = 1
    defaults = GenerationDefaults(num_inference_steps=28, guidance_scale=2.5, true_cfg_scale=1.0)

    def call_kwargs(self, pipe, inputs):
        # The pipeline rescales the requested size to `max_area` pixels: asking for exactly that area keeps it.
        return {
            **super().call_kwargs(pipe, inputs),
            "image": inputs.images[0],
            "max_area": inputs.width * inputs.height,
        }


def flux_gate(block: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """The first double-stream block's AdaLayerNormZero output: norm(x) * (1 + scale_msa) + shift_msa."""
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]


# TeaCache4FLUX's coefficients (FLUX.1 [dev]).
FLUX_COEFFICIENTS = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)

# Flux runs its double-stream blocks, then its single-stream ones; both take and return (encoder_hidden_states,
# hidden_states), so the stack spans both lists. FluxKontextPipeline calls the transformer outside
# `cache_context`: the target's default branch names (cond, then uncond, per step) name its calls.
register_cache_target(
    "diffusers.models.transformers.transformer_flux.FluxTransformer2DModel",
    CacheTarget(
        blocks=lambda transformer: [*transformer.transformer_blocks, *transformer.single_transformer_blocks],
        gate=flux_gate,
        defaults={
            "tea_cache": {"coefficients": FLUX_COEFFICIENTS},
            # MagCache's FLUX.1 [dev] ratios (28 steps), as diffusers ships them.
            "mag_cache": {"mag_ratios": tuple(FLUX_MAG_RATIOS.tolist())},
        },
    ),
)

register_family(Flux())
register_family(FluxKontext())
