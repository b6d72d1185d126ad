"""The model worker: owns the pipeline and its cache backend, runs one request at a time."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..cache import CacheBackend
from ..pipelines import LoadedModel, PipelineInputs
from .request import GenerationRequest, ProgressEvent, RequestCancelledError, RequestMetrics, RequestOutput

ProgressCallback = Callable[[ProgressEvent], None]


class ModelWorker:
    """Runs requests on one loaded model. Not thread-safe: the engine calls it from its single worker thread."""

    def __init__(self, model: LoadedModel, cache: CacheBackend, *, profile: bool = False):
        self.model = model
        self.cache = cache
        self.profile = profile
        self._transformer_calls = 0
        self._transformer_seconds = 0.0
        self._transformer_started = 0.0
        self._mask_pipeline = None
        cache.apply(model.pipeline)
        transformer = model.pipeline.transformer
        transformer.register_forward_pre_hook(self._transformer_starts)
        if profile:
            transformer.register_forward_hook(self._transformer_ends)

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

    def _pipeline_for(self, request: GenerationRequest):
        if request.prompt.mask is None:
            return self.model.pipeline
        if self._mask_pipeline is None:
            self._mask_pipeline = self.model.family.mask_pipeline(self.model.pipeline)
            self._mask_pipeline.set_progress_bar_config(disable=True)
        return self._mask_pipeline

    def run(
        self,
        request: GenerationRequest,
        *,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: ProgressCallback | None = None,
        queue_seconds: float = 0.0,
    ) -> RequestOutput:
        family, pipe = self.model.family, self._pipeline_for(request)
        prompt = request.prompt
        inputs = PipelineInputs(
            prompt=prompt.prompt,
            negative_prompt=request.negative_prompt,
            images=[family.prepare_image(image) for image in prompt.images],
            mask=None if prompt.mask is None else family.prepare_mask(prompt.mask),
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            true_cfg_scale=request.true_cfg_scale,
            guidance_scale=request.guidance_scale,
            num_outputs=request.num_outputs,
            # CPU generators: the same seed gives the same image on any device.
            generators=[torch.Generator("cpu").manual_seed(seed) for seed in request.seeds],
            layers=request.layers,
            resolution=request.resolution,
        )
        kwargs = family.call_kwargs(pipe, inputs)
        steps_done = 0
        previous_latents = final_latents = None

        def on_step_end(pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
            nonlocal steps_done, previous_latents, final_latents
            steps_done = step_index + 1
            self.cache.set_step(step_index + 1)
            if should_stop():
                raise RequestCancelledError(f"request {request.request_id} was cancelled after {steps_done} steps")
            latents = final_latents = callback_kwargs["latents"]
            previews = None
            if step_index in request.preview_steps:
                previews = family.preview(pipeline, step_index, previous_latents, latents, inputs)
            previous_latents = latents
            if on_progress is not None:
                on_progress(ProgressEvent(request.request_id, steps_done, request.num_inference_steps, previews))
            return callback_kwargs

        self.cache.begin_request(request.num_inference_steps, request.params.cache_config)
        self._transformer_calls = 0
        self._transformer_seconds = 0.0
        started = time.perf_counter()
        with torch.inference_mode():
            output = pipe(**kwargs, callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
            images = family.output_images(pipe, output, inputs, final_latents)
        seconds = time.perf_counter() - started
        return RequestOutput(
            request_id=request.request_id,
            prompt=prompt.prompt,
            images=images,
            seed=request.seed,
            seeds=request.seeds,
            width=request.width,
            height=request.height,
            metrics=RequestMetrics(
                queue_seconds=queue_seconds,
                seconds=seconds,
                num_inference_steps=request.num_inference_steps,
                steps=steps_done,
                transformer_calls=self._transformer_calls,
                transformer_seconds=self._transformer_seconds if self.profile else None,
                cache=self.cache.stats(),
            ),
        )
