"""The model worker: owns the pipeline and its cache backend, runs one request at a time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from ..cache import CacheBackend
from ..pipelines import LoadedModel, ModelFamily, PipelineInputs, TextEmbedding
from .prompt_cache import PromptEmbeddingCache
from .request import GenerationRequest, ProgressEvent, RequestMetrics, RequestOutput

ProgressCallback = Callable[[ProgressEvent], None]
StopCheck = Callable[[], None]
"""Raises when the running request must stop (cancelled, past its deadline); returns otherwise."""


def _never_stop() -> None:
    return None


def stoppable_modules(pipeline: Any) -> list[torch.nn.Module]:
    """The modules of `pipeline`'s components that contain others (blocks, attention, feed-forward...): a stop
    check before each of them ends a request inside a long step, at negligible cost per call."""
    components = [value for value in vars(pipeline).values() if isinstance(value, torch.nn.Module)]
    found: dict[int, torch.nn.Module] = {}
    for component in components:
        for module in component.modules():
            if next(module.children(), None) is not None:
                found.setdefault(id(module), module)
    return list(found.values())


class StepTracker:
    """Follows the denoising loop through the pipeline's step callback: stop checks, progress and previews."""

    def __init__(
        self,
        request: GenerationRequest,
        inputs: PipelineInputs,
        family: ModelFamily,
        cache: CacheBackend,
        check_stop: StopCheck,
        on_progress: ProgressCallback | None,
    ):
        self.request, self.inputs, self.family, self.cache = request, inputs, family, cache
        self.check_stop, self.on_progress = check_stop, on_progress
        self.steps_done = 0
        self.previous_latents: torch.Tensor | None = None
        self.final_latents: torch.Tensor | None = None

    def on_step_end(self, pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
        self.steps_done = step_index + 1
        self.cache.set_step(step_index + 1)
        self.check_stop()
        latents = self.final_latents = callback_kwargs["latents"]
        previews = None
        if step_index in self.request.preview_steps:
            previews = self.family.preview(pipeline, step_index, self.previous_latents, latents, self.inputs)
        self.previous_latents = latents
        if self.on_progress is not None:
            request = self.request
            self.on_progress(ProgressEvent(request.request_id, self.steps_done, request.num_inference_steps, previews))
        return callback_kwargs


class ModelWorker:
    """Runs requests on one loaded model. Not thread-safe: the engine calls it from its single worker thread."""

    def __init__(
        self, model: LoadedModel, cache: CacheBackend, prompt_cache: PromptEmbeddingCache, *, profile: bool = False
    ):
        self.model = model
        self.cache = cache
        self.prompt_cache = prompt_cache
        self.profile = profile
        self._transformer_calls = 0
        self._transformer_seconds = 0.0
        self._transformer_started = 0.0
        self._mask_pipeline: Any = None
        self._check_stop: StopCheck = _never_stop
        cache.apply(model.pipeline)
        transformer = model.pipeline.transformer
        transformer.register_forward_pre_hook(self._transformer_starts)
        if profile:
            transformer.register_forward_hook(self._transformer_ends)
        for module in stoppable_modules(model.pipeline):
            module.register_forward_pre_hook(self._check_inside_step)

    def use_cache(self, cache: CacheBackend) -> None:
        """Between requests: take the current backend's hooks off the pipeline and put `cache`'s on. The worker's
        own hooks (stop checks, transformer timing) are torch hooks beside diffusers' and stay as they are."""
        pipeline = self.model.pipeline
        self.cache.remove(pipeline)
        try:
            cache.apply(pipeline)
        except Exception:
            self.cache.apply(pipeline)  # the engine goes on with the backend it had
            raise
        self.cache = cache

    def _synchronize(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _transformer_starts(self, module, args) -> None:
        self._transformer_calls += 1
        if self.profile:
            self._synchronize()
            self._transformer_started = time.perf_counter()

    def _transformer_ends(self, module, args, output) -> None:
        self._synchronize()
        self._transformer_seconds += time.perf_counter() - self._transformer_started

    def _check_inside_step(self, module, args) -> None:
        self._check_stop()

    def _pipeline_for(self, request: GenerationRequest):
        if request.mask is None:
            return self.model.pipeline
        if self._mask_pipeline is None:
            self._mask_pipeline = self.model.family.mask_pipeline(self.model.pipeline)
            self._mask_pipeline.set_progress_bar_config(disable=True)
        return self._mask_pipeline

    def _inputs(self, request: GenerationRequest) -> PipelineInputs:
        family = self.model.family
        return PipelineInputs(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            images=[family.prepare_image(image) for image in request.images],
            mask=None if request.mask is None else family.prepare_mask(request.mask),
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            true_cfg_scale=request.true_cfg_scale,
            guidance_scale=request.guidance_scale,
            num_outputs=request.num_outputs,
            # CPU generators: the same seed gives the same image on any device.
            generators=[torch.Generator("cpu").manual_seed(seed) for seed in request.seeds],
            extra=request.model_knobs,
        )

    def _encode_prompts(self, inputs: PipelineInputs) -> None:
        """Give `inputs` its prompts' embeddings from the prompt cache when the family can encode a text alone
        (masked edits keep their texts: their pipeline encodes them with the image). Inside inference mode, as the
        pipeline's own encoding would be: the cached tensors are inference tensors, usable by every later call."""
        if inputs.mask is not None:
            return
        inputs.prompt_embedding = self._encoded(inputs.prompt)
        if inputs.prompt_embedding is not None and inputs.true_cfg:
            assert inputs.negative_prompt is not None
            inputs.negative_embedding = self._encoded(inputs.negative_prompt)

    def _encoded(self, text: str) -> TextEmbedding | None:
        """`text` encoded by the family (None if it cannot encode a text alone), cached."""
        family, pipe = self.model.family, self.model.pipeline
        key = (self.model.name, family.text_encoder_key(pipe), text)
        return self.prompt_cache.get(key, lambda: family.encode_text(pipe, text))

    def run(
        self,
        request: GenerationRequest,
        *,
        check_stop: StopCheck = _never_stop,
        on_progress: ProgressCallback | None = None,
        queue_seconds: float = 0.0,
    ) -> RequestOutput:
        """Run `request`; `check_stop` is called after every step and before every block of every model call."""
        family, pipe = self.model.family, self._pipeline_for(request)
        inputs = self._inputs(request)
        tracker = StepTracker(request, inputs, family, self.cache, check_stop, on_progress)
        self.cache.begin_request(request.num_inference_steps, request.params.cache_config)
        self._transformer_calls = 0
        self._transformer_seconds = 0.0
        started = time.perf_counter()
        self._check_stop = check_stop
        try:
            with torch.inference_mode():
                self._encode_prompts(inputs)
                output = pipe(
                    **family.call_kwargs(pipe, inputs),
                    callback_on_step_end=tracker.on_step_end,
                    callback_on_step_end_tensor_inputs=["latents"],
                )
                images = family.output_images(pipe, output, inputs, tracker.final_latents)
        finally:
            self._check_stop = _never_stop
        return self._output(request, images, tracker.steps_done, time.perf_counter() - started, queue_seconds)

    def _output(
        self, request: GenerationRequest, images: list[Image.Image], steps: int, seconds: float, queue_seconds: float
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            images=images,
            seed=request.seed,
            seeds=request.seeds,
            width=request.width,
            height=request.height,
            metrics=RequestMetrics(
                queue_seconds=queue_seconds,
                seconds=seconds,
                num_inference_steps=request.num_inference_steps,
                steps=steps,
                transformer_calls=self._transformer_calls,
                transformer_seconds=self._transformer_seconds if self.profile else None,
                cache=self.cache.stats(),
            ),
        )
