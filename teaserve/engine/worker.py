"""The model worker: owns the pipeline and its cache backend, runs one request at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ..cache import CacheBackend, denoising_transformers, row_group_label, stats_of_request
from ..pipelines import LoadedModel, ModelFamily, PipelineInputs, TextEmbedding
from .prompt_cache import PromptEmbeddingCache
from .request import GenerationRequest, ProgressEvent, RequestMetrics, RequestOutput
from .video import GeneratedVideo

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
    """Follows one request through the denoising loop: its progress events and previews."""

    def __init__(
        self,
        request: GenerationRequest,
        inputs: PipelineInputs,
        family: ModelFamily,
        check_stop: StopCheck,
        on_progress: ProgressCallback | None,
    ):
        self.request, self.inputs, self.family = request, inputs, family
        self.check_stop, self.on_progress = check_stop, on_progress
        self.steps_done = 0
        self.previous_latents: torch.Tensor | None = None
        self.final_latents: torch.Tensor | None = None
        self.error: Exception | None = None
        """Why the request stopped while the others of its batch go on."""

    def advance(self, pipeline, step_index: int, latents: torch.Tensor) -> None:
        """Step `step_index` ended with `latents` (this request's rows)."""
        self.steps_done = step_index + 1
        self.final_latents = latents
        previews = None
        if step_index in self.request.preview_steps:
            previews = self.family.preview(pipeline, step_index, self.previous_latents, latents, self.inputs)
        self.previous_latents = latents
        if self.on_progress is not None:
            request = self.request
            self.on_progress(ProgressEvent(request.request_id, self.steps_done, request.num_inference_steps, previews))

    def still_running(self) -> bool:
        """False once the request had to stop (its stop check raised); the error is kept in `error`."""
        if self.error is None:
            try:
                self.check_stop()
            except Exception as error:  # a cancellation or a deadline: this request alone ends
                self.error = error
        return self.error is None


@dataclass
class BatchMember:
    """One request of a batch and how the engine follows it."""

    request: GenerationRequest
    check_stop: StopCheck = _never_stop
    """Raises when the request must stop (cancelled, past its deadline): the others of the batch go on."""
    on_progress: ProgressCallback | None = None
    queue_seconds: float = 0.0


@dataclass
class RunTiming:
    """What one pipeline run cost (shared by the requests of a batch)."""

    seconds: float = 0.0
    transformer_calls: int = 0
    transformer_seconds: float | None = None


class ModelWorker:
    """Runs requests on one loaded model. Not thread-safe: the engine calls it from its single worker thread."""

    def __init__(
        self,
        model: LoadedModel,
        cache: CacheBackend,
        prompt_cache: PromptEmbeddingCache,
        *,
        batched_runs: bool = True,
        profile: bool = False,
    ):
        self.model = model
        self.cache = cache
        self.prompt_cache = prompt_cache
        self.batched_runs = batched_runs
        """Whether requests may run through the family's batched loop (see EngineArgs.batched_runs)."""
        self.profile = profile
        self._transformer_calls = 0
        self._transformer_seconds = 0.0
        self._transformer_started = 0.0
        self._mask_pipeline: Any = None
        self._check_stop: StopCheck = _never_stop
        cache.apply(model.pipeline)
        for transformer in denoising_transformers(model.pipeline):
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

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        """Requests with equal keys can run together in one batched denoising loop (`run_batch`); None: this one
        runs alone (an edit, a family without batched runs, or a cache backend without per-row state)."""
        batchable = self.batched_runs and self.model.family.runs_batches and self.cache.supports_row_groups
        if not batchable or request.images or request.mask:
            return None
        return (
            request.width,
            request.height,
            request.num_inference_steps,
            request.true_cfg_scale,
            request.negative_prompt is not None,
            request.guidance_scale,
            json.dumps(request.params.cache_config, sort_keys=True),
            json.dumps(request.model_knobs, sort_keys=True),
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
        """Run `request` alone; `check_stop` is called after every step and before every block of every model call."""
        output = self.run_batch([BatchMember(request, check_stop, on_progress, queue_seconds)])[0]
        if isinstance(output, Exception):
            raise output
        return output

    def _run_pipeline(self, member: BatchMember) -> RequestOutput:
        """Run a request that cannot be batched through its diffusers pipeline."""
        request, check_stop = member.request, member.check_stop
        family, pipe = self.model.family, self._pipeline_for(request)
        inputs = self._inputs(request)
        tracker = StepTracker(request, inputs, family, check_stop, member.on_progress)

        def on_step_end(pipeline, step_index: int, timestep, callback_kwargs: dict) -> dict:
            self.cache.set_step(step_index + 1)
            check_stop()
            tracker.advance(pipeline, step_index, callback_kwargs["latents"])
            return callback_kwargs

        self.cache.begin_request(request.num_inference_steps, request.params.cache_config)
        with self._running(check_stop) as timing:
            self._encode_prompts(inputs)
            output = pipe(
                **family.call_kwargs(pipe, inputs),
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"],
            )
            if family.makes_video:
                frames = family.output_videos(pipe, output, inputs)
                videos = [GeneratedVideo(video, fps=inputs.extra["fps"]) for video in frames]
                images: list[Image.Image] = []
            else:
                videos = []
                images = family.output_images(pipe, output, inputs, tracker.final_latents)
        output = self._output(member, images, tracker.steps_done, timing, self.cache.stats(), batch_size=1)
        output.videos = videos
        return output

    def run_batch(self, members: list[BatchMember]) -> list[RequestOutput | Exception]:
        """Run requests of one `batch_key` together; each gets its own images, statistics and stop check. A request
        that has to stop gets its error while the others go on; the batch ends early only when all have stopped.
        An error of the batch itself (the pipeline raised) raises. A request that `batch_key` leaves alone runs
        through its diffusers pipeline."""
        if len(members) == 1 and self.batch_key(members[0].request) is None:
            return [self._run_pipeline(members[0])]
        family, pipe = self.model.family, self.model.pipeline
        first = members[0].request
        batch = [self._inputs(member.request) for member in members]
        trackers = [
            StepTracker(member.request, inputs, family, member.check_stop, member.on_progress)
            for member, inputs in zip(members, batch, strict=True)
        ]
        ends = itertools.accumulate(inputs.num_outputs for inputs in batch)
        rows = [slice(end - inputs.num_outputs, end) for end, inputs in zip(ends, batch, strict=True)]

        def check_stop() -> None:
            running = [tracker.still_running() for tracker in trackers]
            if not any(running):
                raise next(tracker.error for tracker in trackers if tracker.error is not None)

        def on_step_end(step_index: int, latents: torch.Tensor) -> None:
            self.cache.set_step(step_index + 1)
            check_stop()
            for tracker, own_rows in zip(trackers, rows, strict=True):
                if tracker.error is None:
                    tracker.advance(pipe, step_index, latents[own_rows])

        batch_rows = family.batch_rows(batch)
        self.cache.begin_request(first.num_inference_steps, first.params.cache_config)
        self.cache.set_row_groups([row_group_label(index, branch) for index, branch in batch_rows])
        try:
            with self._running(check_stop) as timing:
                for inputs in batch:
                    self._encode_prompts(inputs)
                images = family.run_batch(pipe, batch, on_step_end)
        except Exception:
            if all(tracker.error is not None for tracker in trackers):  # each stopped: each gets its own reason
                return [tracker.error for tracker in trackers if tracker.error is not None]
            raise
        stats = self.cache.stats()
        results: list[RequestOutput | Exception] = []
        for index, (member, tracker) in enumerate(zip(members, trackers, strict=True)):
            # A batched call evaluates each of the request's CFG branches: count it as the calls they make alone.
            branches = len({branch for row_index, branch in batch_rows if row_index == index})
            own_timing = dataclasses.replace(timing, transformer_calls=timing.transformer_calls * branches)
            own_stats = stats_of_request(stats, index)
            output = self._output(member, images[index], tracker.steps_done, own_timing, own_stats, len(members))
            results.append(tracker.error or output)
        return results

    @contextlib.contextmanager
    def _running(self, check_stop: StopCheck) -> Iterator[RunTiming]:
        """Around one pipeline run: inference mode, the stop check inside steps, the transformer's counters."""
        timing = RunTiming()
        self._transformer_calls = 0
        self._transformer_seconds = 0.0
        self._check_stop = check_stop
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                yield timing
        finally:
            self._check_stop = _never_stop
            timing.seconds = time.perf_counter() - started
            timing.transformer_calls = self._transformer_calls
            timing.transformer_seconds = self._transformer_seconds if self.profile else None

    @staticmethod
    def _output(
        member: BatchMember,
        images: list[Image.Image],
        steps: int,
        timing: RunTiming,
        cache_stats: dict[str, Any] | None,
        batch_size: int,
    ) -> RequestOutput:
        request = member.request
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            images=images,
            seed=request.seed,
            seeds=request.seeds,
            width=request.width,
            height=request.height,
            metrics=RequestMetrics(
                queue_seconds=member.queue_seconds,
                seconds=timing.seconds,
                num_inference_steps=request.num_inference_steps,
                steps=steps,
                transformer_calls=timing.transformer_calls,
                transformer_seconds=timing.transformer_seconds,
                cache=cache_stats,
                batch_size=batch_size,
            ),
        )
