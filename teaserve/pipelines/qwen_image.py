"""The Qwen-Image family: text-to-image (QwenImagePipeline)."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .base import GenerationDefaults, ModelFamily, PipelineInputs
from .registry import register_family

# The Qwen-Image model card samples with a blank negative prompt and true CFG 4.0.
QWEN_DEFAULTS = GenerationDefaults(num_inference_steps=50, true_cfg_scale=4.0, negative_prompt=" ")


def decode_packed_latents(pipe, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    """Decode packed Qwen-Image latents exactly as the pipeline's final step does."""
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
    config = pipe.vae.config
    shape = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape).to(latents)
    std = torch.tensor(config.latents_std).view(shape).to(latents)
    image = pipe.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pil")


class QwenImage(ModelFamily):
    architecture = "QwenImagePipeline"
    pipeline_class = "QwenImagePipeline"
    defaults = QWEN_DEFAULTS

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        do_cfg = inputs.true_cfg_scale > 1 and inputs.negative_prompt is not None
        kwargs = {
            "prompt": inputs.prompt,
            # The pipeline runs true CFG exactly when it gets a negative prompt and a scale above 1.
            "negative_prompt": inputs.negative_prompt if do_cfg else None,
            "true_cfg_scale": inputs.true_cfg_scale,
            "width": inputs.width,
            "height": inputs.height,
            "num_inference_steps": inputs.num_inference_steps,
            "num_images_per_prompt": inputs.num_outputs,
            "generator": inputs.generators,
            "output_type": "pil",
        }
        if inputs.guidance_scale is not None and pipe.transformer.config.guidance_embeds:
            kwargs["guidance_scale"] = inputs.guidance_scale
        return kwargs

    def decode_preview(self, pipe, latents, width, height):
        return decode_packed_latents(pipe, latents, width, height)


register_family(QwenImage())
