"""BAGEL as a teaserve model family: text to image, and editing with one input image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...cache import CacheTarget, register_cache_target
from ..base import GenerationDefaults, ModelFamily, PipelineInputs
from ..registry import register_family
from .config import CHECKPOINT_FILES


class Bagel(ModelFamily):
    """ByteDance-Seed/BAGEL-7B-MoT. The request's CFG knobs map to BAGEL's two guidance scales:

    true_cfg_scale -> cfg_text_scale (default 4.0); guidance_scale -> cfg_img_scale (default None: 1.0 for
    text to image, 2.0 for edits, the reference notebook's values). A negative prompt, when given, fills the
    text-dropped branch. An edit's output has the input image's size after BAGEL's resize (longest side at
    most 1024, shortest at least 512, multiples of 16), so edits take no size.
    """

    architecture = "BagelForConditionalGeneration"
    pipeline_class = "BagelPipeline"
    task = "image-edit"
    min_input_images = 0
    max_input_images = 1
    # 49 Euler steps = the reference schedule num_timesteps=50 (its last point, t = 0, is never evaluated).
    defaults = GenerationDefaults(num_inference_steps=49, true_cfg_scale=4.0)

    def matches_folder(self, folder: Path) -> bool:
        return all((folder / name).is_file() for name in CHECKPOINT_FILES)

    def load(self, source, device, dtype):
        from .loader import load_bagel_pipeline

        return load_bagel_pipeline(Path(source), device, dtype)

    def size_multiple(self, pipe) -> int:
        return pipe.size_multiple

    def check_size(self, pipe, width, height):
        pipe.check_size(width, height)

    def default_size(self, pipe) -> tuple[int, int]:
        side = pipe.config.max_image_side
        return side, side

    def fixed_output_size(self, pipe, images, knobs, masked):
        return pipe.edit_size(images[0])

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        from .pipeline import SamplingSettings

        return {
            "prompt": inputs.prompt,
            "image": inputs.images[0] if inputs.images else None,
            "negative_prompt": inputs.negative_prompt,
            "width": inputs.width,
            "height": inputs.height,
            "num_inference_steps": inputs.num_inference_steps,
            "sampling": SamplingSettings.for_task(
                editing=bool(inputs.images), cfg_text_scale=inputs.true_cfg_scale, cfg_img_scale=inputs.guidance_scale
            ),
            "generator": inputs.generators,
            "num_images_per_prompt": inputs.num_outputs,
        }

    def decode_preview(self, pipe, latents, inputs):
        return pipe.decode(latents, inputs.width, inputs.height)


def bagel_gate(block: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """BAGEL has no adaLN: the flow time is added to the latent tokens, so the packed generation block entering the
    first MoT layer (image markers + latent tokens) is the timestep-dependent signal, as in vLLM-Omni."""
    return arguments["hidden_states"]


# vLLM-Omni's TeaCache coefficients for BAGEL-7B-MoT.
BAGEL_COEFFICIENTS = (1.33313129e6, -1.68644226e5, 7.95050740e3, -1.63747873e2, 1.26352397)

# The block stack is the language model's MoT decoder layers; the noisy image runs through their plain forward
# (context blocks are prefilled with `forward_with_kv`, which no hook sees), once per CFG branch.
register_cache_target(
    "teaserve.pipelines.bagel.model.BagelModel",
    CacheTarget(
        blocks=lambda model: model.language_model.model.layers,
        gate=bagel_gate,
        defaults={"tea_cache": {"coefficients": BAGEL_COEFFICIENTS}},
    ),
)

register_family(Bagel())
