"""The Qwen-Image family: text to image, Edit, Edit-Plus (2509: several input images) and Layered."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from ..cache import ROWS_CONTEXT, CacheTarget, StackShortcut, register_cache_target
from .base import GenerationDefaults, ModelFamily, ModelKnobs, PipelineInputs, Task, TextEmbedding
from .qwen_image_vae import use_single_frame_convs
from .qwen_processor import load_processor_without_torchvision
from .registry import register_family

# The Qwen-Image model cards sample with a blank negative prompt and true CFG 4.0.
QWEN_DEFAULTS = GenerationDefaults(num_inference_steps=50, true_cfg_scale=4.0, negative_prompt=" ")


def decode_packed_latents(pipe, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
    """Decode packed Qwen-Image latents exactly as the pipelines' final step does."""
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
    image = pipe.vae.decode(_denormalize(pipe.vae, latents), return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def _denormalize(vae, latents: torch.Tensor) -> torch.Tensor:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents)
    return latents * std + mean


def _embedding_kwargs(name: str, embedding: TextEmbedding) -> dict[str, torch.Tensor]:
    """`encode_prompt`'s (embeddings, mask) as the pipelines take them back: `name` and `name`_mask.

    `encode_prompt` drops a mask that marks every token valid; the pipelines warn about embeddings without a mask
    on every call, so the mask goes back in, all ones (they drop it again).
    """
    embeds, mask = embedding
    assert embeds is not None
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return {name: embeds, f"{name}_mask": mask}


class QwenImage(ModelFamily):
    architecture = "QwenImagePipeline"
    pipeline_class = "QwenImagePipeline"
    defaults = QWEN_DEFAULTS
    runs_batches = True
    max_sequence_length: ClassVar[int] = 512
    """Prompt tokens the text encoder's output is cut to (the pipelines' own default)."""

    def load(self, source, device, dtype):
        pipe = super().load(source, device, dtype)
        use_single_frame_convs(pipe.vae)
        return pipe

    def common_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        kwargs = {
            **self.prompt_kwargs(inputs),
            "true_cfg_scale": inputs.true_cfg_scale,
            "max_sequence_length": self.max_sequence_length,
            "num_inference_steps": inputs.num_inference_steps,
            "num_images_per_prompt": inputs.num_outputs,
            "generator": inputs.generators,
            "output_type": "pil",
        }
        if inputs.guidance_scale is not None and pipe.transformer.config.guidance_embeds:
            kwargs["guidance_scale"] = inputs.guidance_scale
        return kwargs

    @staticmethod
    def prompt_kwargs(inputs: PipelineInputs) -> dict[str, Any]:
        """The prompts as texts, or as the embeddings the engine encoded: the pipelines take one or the other, and
        repeat either for each image. The negative prompt only with true CFG."""
        kwargs: dict[str, Any] = {}
        if inputs.prompt_embedding is None:
            kwargs["prompt"] = inputs.prompt
        else:
            kwargs.update(prompt=None, **_embedding_kwargs("prompt_embeds", inputs.prompt_embedding))
        if not inputs.true_cfg:
            kwargs["negative_prompt"] = None
        elif inputs.negative_embedding is None:
            kwargs["negative_prompt"] = inputs.negative_prompt
        else:
            kwargs.update(_embedding_kwargs("negative_prompt_embeds", inputs.negative_embedding))
        return kwargs

    def call_kwargs(self, pipe, inputs: PipelineInputs) -> dict[str, Any]:
        return {**self.common_kwargs(pipe, inputs), "width": inputs.width, "height": inputs.height}

    def encode_text(self, pipe, text: str) -> TextEmbedding | None:
        """(prompt_embeds [1, tokens, dim], its mask [1, tokens], or None when every token is valid)."""
        return pipe.encode_prompt(
            text,
            device=pipe._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )

    def text_encoder_key(self, pipe) -> tuple:
        return (self.max_sequence_length, pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx)

    def decode_preview(self, pipe, latents, inputs):
        return decode_packed_latents(pipe, latents, inputs.width, inputs.height)

    # -- batched runs ----------------------------------------------------------------------------------
    def batch_rows(self, batch: list[PipelineInputs]) -> list[tuple[int, str]]:
        rows = [(index, "cond") for index, inputs in enumerate(batch) for _ in range(inputs.num_outputs)]
        if batch[0].true_cfg:
            rows += [(index, "uncond") for index, inputs in enumerate(batch) for _ in range(inputs.num_outputs)]
        return rows

    def _embedding(self, pipe, inputs: PipelineInputs, branch: str) -> TextEmbedding:
        """The prompt (cond) or negative prompt (uncond) of `inputs` encoded: as the engine encoded it, else now."""
        embedding = inputs.prompt_embedding if branch == "cond" else inputs.negative_embedding
        if embedding is None:
            text = inputs.prompt if branch == "cond" else inputs.negative_prompt
            assert text is not None, "an uncond row exists only with a negative prompt"
            embedding = self.encode_text(pipe, text)
        assert embedding is not None, "Qwen-Image encodes a text alone"
        return embedding

    def run_batch(self, pipe, batch, on_step_end):
        """QwenImagePipeline's sampling with both CFG branches of every output in one transformer call."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        first = batch[0]
        # The transformer's device: the pipeline's `_execution_device` walks every module of every component (10 ms
        # on the embedded model) to allow for offloading hooks, which teaserve does not install.
        transformer, scheduler = pipe.transformer, pipe.scheduler
        device = transformer.device
        rows = self.batch_rows(batch)
        text_rows = [self._embedding(pipe, batch[index], branch) for index, branch in rows]
        prompt_embeds, prompt_mask = stack_text_rows(text_rows)
        outputs = sum(inputs.num_outputs for inputs in batch)
        latents = pipe.prepare_latents(
            outputs,
            transformer.config.in_channels // 4,
            first.height,
            first.width,
            prompt_embeds.dtype,
            device,
            [generator for inputs in batch for generator in inputs.generators],
        )
        scale = pipe.vae_scale_factor * 2
        img_shapes = [[(1, first.height // scale, first.width // scale)]] * len(rows)
        sigmas = np.linspace(1.0, 1 / first.num_inference_steps, first.num_inference_steps)
        config = scheduler.config
        mu = calculate_shift(
            latents.shape[1],
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, first.num_inference_steps, device, sigmas=sigmas, mu=mu)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full([len(rows)], first.guidance_scale, device=device, dtype=torch.float32)
        scheduler.set_begin_index(0)
        for step_index, t in enumerate(timesteps):
            model_input = torch.cat([latents, latents]) if first.true_cfg else latents
            with transformer.cache_context(ROWS_CONTEXT):
                prediction = transformer(
                    hidden_states=model_input,
                    timestep=t.expand(len(rows)).to(latents.dtype) / 1000,
                    guidance=guidance,
                    encoder_hidden_states_mask=prompt_mask,
                    encoder_hidden_states=prompt_embeds,
                    img_shapes=img_shapes,
                    attention_kwargs={},
                    return_dict=False,
                )[0]
            if first.true_cfg:
                cond, uncond = prediction.chunk(2)
                combined = uncond + first.true_cfg_scale * (cond - uncond)
                # The pipeline's rescaling: the guided prediction keeps the conditional one's norm per token.
                norms = torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True)
                prediction = combined * norms
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
            on_step_end(step_index, latents)
        images = decode_packed_latents(pipe, latents, first.width, first.height)
        ends = np.cumsum([inputs.num_outputs for inputs in batch])
        return [images[end - inputs.num_outputs : end] for end, inputs in zip(ends, batch, strict=True)]


def stack_text_rows(rows: list[TextEmbedding]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings (embeddings, mask or None) of several texts as one batch: padded to the longest, with a mask
    where any is padded or masked (the transformer's attention then ignores the padding); no mask where none needs
    one."""
    pairs: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    for embeds, mask in rows:
        assert embeds is not None
        pairs.append((embeds, mask))
    length = max(embeds.shape[1] for embeds, _ in pairs)
    if all(embeds.shape[1] == length and mask is None for embeds, mask in pairs):
        return torch.cat([embeds for embeds, _ in pairs]), None
    padded, masks = [], []
    for embeds, mask in pairs:
        missing = length - embeds.shape[1]
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        padded.append(torch.nn.functional.pad(embeds, (0, 0, 0, missing)))
        masks.append(torch.nn.functional.pad(mask, (0, missing)))
    return torch.cat(padded), torch.cat(masks)


class QwenImageEdit(QwenImage):
    """One input image; masked edits run QwenImageEditInpaintPipeline on the same components."""

    runs_batches = False

    architecture = "QwenImageEditPipeline"
    pipeline_class = "QwenImageEditPipeline"
    task: ClassVar[Task] = "image-edit"
    min_input_images = 1
    max_input_images = 1
    mask_pipeline_class: ClassVar[str | None] = "QwenImageEditInpaintPipeline"

    def pretrained_kwargs(self, folder):
        processor = load_processor_without_torchvision(folder)
        return {} if processor is None else {"processor": processor}

    def edit_image(self, inputs: PipelineInputs):
        return inputs.images[0]

    def encode_text(self, pipe, text: str) -> TextEmbedding | None:
        return None  # the edit pipelines encode the prompt together with the input image(s)

    def call_kwargs(self, pipe, inputs):
        kwargs = {**super().call_kwargs(pipe, inputs), "image": self.edit_image(inputs)}
        if inputs.mask is not None:
            # strength 1: the masked area is repainted over all the steps, so step indices match the request's.
            kwargs.update(mask_image=inputs.mask, strength=1.0)
        return kwargs

    def fixed_output_size(self, pipe, images, knobs, masked):
        if not masked:
            return None
        # The inpainting pipeline always works at about one megapixel with the input's aspect ratio.
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_inpaint import calculate_dimensions

        image_width, image_height = images[0].size
        width, height, _ = calculate_dimensions(1024 * 1024, image_width / image_height)
        multiple = self.size_multiple(pipe)
        return width // multiple * multiple, height // multiple * multiple

    def prepare_mask(self, mask: Image.Image) -> Image.Image:
        """OpenAI masks mark the area to edit with transparency; diffusers repaints where the mask is white."""
        if mask.mode in ("RGBA", "LA") or "transparency" in mask.info:
            alpha = mask.convert("RGBA").getchannel("A")
            return alpha.point(lambda value: 255 if value == 0 else 0).convert("RGB")
        return mask.convert("L").convert("RGB")


class QwenImageEditPlus(QwenImageEdit):
    """Qwen-Image-Edit-2509 and later: one to three input images, no masked edits."""

    architecture = "QwenImageEditPlusPipeline"
    pipeline_class = "QwenImageEditPlusPipeline"
    max_input_images = 3
    mask_pipeline_class = None
    defaults = GenerationDefaults(num_inference_steps=40, true_cfg_scale=4.0, negative_prompt=" ")

    def edit_image(self, inputs: PipelineInputs):
        return list(inputs.images)


class LayeredKnobs(ModelKnobs):
    """Qwen-Image-Layered's own request parameters."""

    layers: int = Field(default=4, ge=2, le=10, description="RGBA layers to decompose the input image into")
    resolution: Literal[640, 1024] = Field(
        default=640, description="working resolution: the output has about resolution x resolution pixels"
    )


class QwenImageLayered(QwenImageEdit):
    """Decomposes one image into `layers` RGBA layers; returns the recomposed image first, then each layer."""

    architecture = "QwenImageLayeredPipeline"
    pipeline_class = "QwenImageLayeredPipeline"
    task = "image-layers"
    mask_pipeline_class = None
    defaults = GenerationDefaults(num_inference_steps=50, true_cfg_scale=4.0, negative_prompt=" ")
    knobs = LayeredKnobs

    def prepare_image(self, image: Image.Image) -> Image.Image:
        return image.convert("RGBA")

    def fixed_output_size(self, pipe, images, knobs, masked):
        """The pipeline sizes its output from `resolution` and the input's aspect ratio."""
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_layered import calculate_dimensions

        image_width, image_height = images[0].size
        resolution = knobs["resolution"]
        width, height = calculate_dimensions(resolution * resolution, image_width / image_height)
        multiple = self.size_multiple(pipe)
        return width // multiple * multiple, height // multiple * multiple

    def images_per_output(self, knobs):
        return knobs["layers"] + 1  # the recomposed image, then each layer

    def call_kwargs(self, pipe, inputs):
        kwargs = self.common_kwargs(pipe, inputs)
        kwargs.update(
            image=inputs.images[0],
            layers=inputs.extra["layers"],
            resolution=inputs.extra["resolution"],
            cfg_normalize=True,
            use_en_prompt=True,
        )
        return kwargs

    def output_images(self, pipe, output, inputs, final_latents):
        # The pipeline returns the layers only (its per-output lists are mis-sliced when there are several):
        # flatten them and put each output's recomposed image, decoded from frame 0, in front of its layers.
        count = inputs.extra["layers"]
        layers = [image for group in output.images for image in group]
        composites = self.decode_frames(pipe, final_latents, inputs)[:: count + 1]
        images = []
        for index, composite in enumerate(composites):
            images += [composite, *layers[index * count : (index + 1) * count]]
        return images

    def decode_frames(self, pipe, latents, inputs: PipelineInputs) -> list[Image.Image]:
        """Every frame of every output: the recomposed image first, then its layers, output after output."""
        count = inputs.extra["layers"]
        frames = pipe._unpack_latents(latents, inputs.height, inputs.width, count, pipe.vae_scale_factor)
        frames = frames.to(pipe.vae.dtype)
        frames = _denormalize(pipe.vae, frames)
        batch, channels, count, latent_height, latent_width = frames.shape
        frames = frames.permute(0, 2, 1, 3, 4).reshape(batch * count, channels, 1, latent_height, latent_width)
        decoded = pipe.vae.decode(frames, return_dict=False)[0].squeeze(2)
        return pipe.image_processor.postprocess(decoded, output_type="pil")

    def decode_preview(self, pipe, latents, inputs):
        return self.decode_frames(pipe, latents, inputs)[:: inputs.extra["layers"] + 1]  # each recomposed image


def qwen_image_gate(block: Any, arguments: dict[str, Any]) -> torch.Tensor:
    """The image stream's first modulation in a QwenImageTransformerBlock: img_norm1(x) * (1 + scale) + shift,
    through the block's own `_modulate` so that per-token modulation (zero_cond_t, Edit-2511) is honoured."""
    first_modulation = block.img_mod(arguments["temb"]).chunk(2, dim=-1)[0]
    modulated, _ = block._modulate(
        block.img_norm1(arguments["hidden_states"]), first_modulation, arguments.get("modulate_index")
    )
    return modulated


def qwen_image_enter(transformer, arguments: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """QwenImageTransformer2DModel.forward up to its first block: the image stream and the timestep embedding
    (per-token modulation, zero_cond_t, and ControlNet residuals are left to the whole forward)."""
    if transformer.zero_cond_t or arguments.get("controlnet_block_samples") is not None:
        return None
    hidden = transformer.img_in(arguments["hidden_states"])
    timestep = arguments["timestep"].to(hidden.dtype)
    extra, guidance = arguments.get("additional_t_cond"), arguments.get("guidance")
    if guidance is None:
        return hidden, transformer.time_text_embed(timestep, hidden, extra)
    return hidden, transformer.time_text_embed(timestep, guidance.to(hidden.dtype) * 1000, hidden, extra)


def qwen_image_leave(transformer, hidden: torch.Tensor, temb: torch.Tensor, arguments: dict[str, Any]):
    """QwenImageTransformer2DModel.forward after its last block: the output head on the image stream."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    output = transformer.proj_out(transformer.norm_out(hidden, temb))
    return Transformer2DModelOutput(sample=output) if arguments.get("return_dict", True) else (output,)


# vLLM-Omni's hand-rounded TeaCache coefficients, shared by Edit, Edit-Plus and Layered.
QWEN_IMAGE_COEFFICIENTS = (-450.0, 280.0, -45.0, 3.2, -0.02)

# MagCache4QwenImage's magnitude ratios (Zehong-Ma/MagCache, 50 steps; its cond and uncond curves are equal),
# with the first step's 1.0; diffusers interpolates them to other step counts.
QWEN_IMAGE_MAG_RATIOS = (1.0, 1.64062, 1.45312, 1.1875, 1.17188, 1.05469, 1.21094, 1.10938, 1.11719, 1.13281,
    1.11719, 1.07812, 1.07031, 1.08594, 1.08594, 1.07812, 1.03906, 1.04688, 1.07812, 1.07031, 1.03125, 1.07812,
    1.04688, 1.04688, 1.04688, 1.03906, 1.01562, 1.03125, 1.02344, 1.02344, 1.02344, 1.03906, 1.0, 1.01562, 1.0,
    0.99219, 1.00781, 0.98047, 0.95703, 0.96875, 0.99219, 0.92578, 0.92578, 0.90625, 0.85938, 0.80469, 0.87891,
    0.75, 0.60938, 0.55078)  # fmt: skip

register_cache_target(
    "diffusers.models.transformers.transformer_qwenimage.QwenImageTransformer2DModel",
    CacheTarget(
        blocks=lambda transformer: transformer.transformer_blocks,
        gate=qwen_image_gate,
        shortcut=StackShortcut(enter=qwen_image_enter, leave=qwen_image_leave),
        defaults={
            "tea_cache": {"coefficients": QWEN_IMAGE_COEFFICIENTS},
            "mag_cache": {"mag_ratios": QWEN_IMAGE_MAG_RATIOS},
        },
    ),
)

register_family(QwenImage())
register_family(QwenImageEdit())
register_family(QwenImageEditPlus())
register_family(QwenImageLayered())
