"""The Flux family: FluxPipeline (text to image) and FluxKontextPipeline (edit with one input image)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from ..cache import CacheTarget, register_cache_target
from .base import GenerationDefaults, ModelFamily, PipelineInputs
from .registry import register_family


class Flux(ModelFamily):
    """FLUX.1 [dev]-style models: guidance-distilled (`guidance_scale` is an input of the transformer), optional
    true CFG when a negative prompt comes with `true_cfg_scale` > 1."""

    architecture = "FluxPipeline"
    pipeline_class = "FluxPipeline"
    defaults = GenerationDefaults(num_inference_steps=28, guidance_scale=3.5, true_cfg_scale=1.0)

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        do_cfg = inputs.true_cfg_scale > 1 and inputs.negative_prompt is not None
        return {
            "prompt": inputs.prompt,
            "negative_prompt": inputs.negative_prompt if do_cfg else None,
            "true_cfg_scale": inputs.true_cfg_scale,
            "guidance_scale": inputs.guidance_scale,
            "width": inputs.width,
            "height": inputs.height,
            "num_inference_steps": inputs.num_inference_steps,
            "num_images_per_prompt": inputs.num_outputs,
            "generator": inputs.generators,
            "output_type": "pil",
        }

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
