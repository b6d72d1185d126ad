"""The engine: a bounded queue in front of one worker thread that owns the model."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import math
import os
import queue
import random
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from pydantic import ValidationError

from ..cache import CACHE_BACKEND_ENV, CACHE_BACKENDS, CacheBackend, resolve_backend_name
from ..cache.base import QUALITY_TARGET, check_quality_target
from ..pipelines import KnobValueError, LoadedModel, architectures_with_knob, editing_architectures, load_model
from .args import EngineArgs
from .cache_profile import CacheProfile
from .client import ServedCache, ServedModel
from .errors import (
    DeviceOutOfMemoryError,
    EngineStoppedError,
    GenerationError,
    InvalidImageError,
    InvalidParameterError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
)
from .images import ImageSource, open_inputs
from .limits import check_seed, check_size_limits, check_work_limits
from .params import OmniDiffusionSamplingParams, parameter_error
from .prompt_cache import PromptEmbeddingCache
from .request import GenerationRequest, ProgressEvent, PromptInput, RequestOutput
from .worker import BatchMember, ModelWorker

logger = logging.getLogger(__name__)


class RequestHandle:
    """A submitted request: its future, its cancellation flag and its progress listener."""

    def __init__(self, request: GenerationRequest, on_progress: Callable[[ProgressEvent], None] | None):
        self.request = request
        self.future: Future[RequestOutput] = Future()
        self.submitted_at = time.perf_counter()
        self._cancel_requested = threading.Event()
        self._on_progress = on_progress

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def cancel(self) -> None:
        """Cancel: a queued request never runs, a running one stops at the next model block it enters."""
        self._cancel_requested.set()
        self.future.cancel()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested.is_set()

    def emit(self, event: ProgressEvent) -> None:
        if self._on_progress is not None:
            self._on_progress(event)

    def result(self, timeout: float | None = None) -> RequestOutput:
        return self.future.result(timeout)


class AsyncEngine:
    """Owns one model on one worker thread; usable from threads (`submit`) and from asyncio (`generate`).

    `AsyncEngine(EngineArgs(...))`, or `AsyncEngine(model, **settings)` with EngineArgs fields as keywords.
    Requests run one at a time in submission order. The queue is bounded: when it is full, `submit` raises
    QueueFullError (or waits, with block=True). A request over one of the limits is refused by `prepare`; one
    that runs past `request_timeout` fails with RequestTimeoutError, even in the middle of a step.
    """

    def __init__(self, model: str | Path | LoadedModel | EngineArgs | None = None, **settings: Any):
        self.args = args = EngineArgs.of(model, settings)
        self.cache_profile = CacheProfile() if args.cache_profile is None else CacheProfile.read(args.cache_profile)
        if args.cache_backend or os.environ.get(CACHE_BACKEND_ENV):  # else the model's own choice, known once loaded
            chosen = resolve_backend_name(args.cache_backend)
            check_settings_before_loading(chosen, self.cache_profile.settings.get(chosen), args.cache_config)
        if isinstance(args.model, LoadedModel):
            self.model = args.model
        else:
            self.model = load_model(args.model, device=args.device, dtype=args.dtype)
        self.cache_profile.check_transformer(self.model.pipeline.transformer)
        backend_name = resolve_backend_name(args.cache_backend, self.model.default_cache_backend)
        self.prompt_cache = PromptEmbeddingCache(args.prompt_cache_size)
        """Encoded prompts kept for reuse; its `hits` and `misses` count the worker's look-ups."""
        self._worker = ModelWorker(
            self.model,
            self.create_cache_backend(backend_name, args.cache_config),
            self.prompt_cache,
            batched_runs=args.batched_runs,
            profile=args.profile,
        )
        self.served_model = ServedModel.of(self.model, self.cache)
        self.max_queue_size = args.max_queue_size
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue(maxsize=args.max_queue_size)
        self._run_lock = threading.Lock()
        """Held while a request runs: a backend swap never overlaps one."""
        self._active: dict[str, RequestHandle] = {}
        self._running: list[RequestHandle] = []
        """The requests the worker is running (one batch)."""
        self._progress_at: float | None = None
        self._seconds_per_request = 1.0
        self._last_batch_size = 1
        """Requests in the last batch: how many partners the next one waits for (see `_take_partners`)."""
        self._accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="teaserve-worker", daemon=True)
        self._thread.start()

    # -- the cache backend ---------------------------------------------------------------------
    @property
    def cache(self) -> CacheBackend:
        """The cache backend requests run with."""
        return self._worker.cache

    @property
    def cache_backend_name(self) -> str:
        return self.cache.name

    def cache_settings(self, name: str, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """The server settings of backend `name` on this model: the model folder's own, then the cache profile's,
        then `settings` (each layer over the previous one the way the backend merges settings)."""
        backend = CACHE_BACKENDS[name]
        merged: dict[str, Any] = {}
        for layer in (self.model.cache_defaults.get(name), self.cache_profile.settings.get(name), settings):
            merged = backend.merge_settings(merged, layer)
        return merged

    def create_cache_backend(self, name: str, settings: dict[str, Any] | None = None) -> CacheBackend:
        """A backend `name` for this model with `settings` over the model's and the profile's (see
        `cache_settings`); bad settings raise a ValueError. Not applied: see `use_cache_backend`."""
        name = resolve_backend_name(name)
        return CACHE_BACKENDS[name].from_config(self.cache_settings(name, settings))

    def use_cache_backend(self, backend: CacheBackend) -> CacheBackend:
        """Run the next requests with `backend` (e.g. one from `create_cache_backend`) and return the one it
        replaces: the current backend's hooks come off the pipeline and `backend`'s go on.

        For tools that compare backends on one loaded model. Only while the engine is idle: with a request queued
        or running it raises a RuntimeError; requests prepared before the swap were checked against the old one.
        """
        if not self.is_alive or not self._accepting:
            raise EngineStoppedError("the engine is shutting down")
        busy = RuntimeError("the cache backend can only be swapped while no request is queued or running")
        if not self._run_lock.acquire(blocking=False):
            raise busy
        try:
            with self._queue.mutex:
                if self._queue.unfinished_tasks > 0:
                    raise busy
            previous = self._worker.cache
            self._worker.use_cache(backend)
            self.served_model = dataclasses.replace(self.served_model, cache=ServedCache.of(backend))
        finally:
            self._run_lock.release()
        return previous

    # -- state -------------------------------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return not self._stopped and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        """Requests waiting, not counting the one running."""
        return self._queue.qsize()

    @property
    def num_running(self) -> int:
        return len(self._running)

    # -- admission ---------------------------------------------------------------------------------
    def check_inputs(self, image_count: int, has_mask: bool) -> None:
        """Refuse a number of input images, or a mask, that the model does not take (nothing is decoded yet)."""
        model, family = self.model, self.model.family
        if not family.min_input_images <= image_count <= family.max_input_images:
            if family.max_input_images == 0:
                raise InvalidImageError(
                    f"model {model.name} ({model.architecture}) generates from text only and takes no input image; "
                    f"architectures that edit images: {', '.join(editing_architectures())}"
                )
            raise InvalidImageError(
                f"model {model.name} ({model.architecture}) takes {family.min_input_images} to "
                f"{family.max_input_images} input image(s), got {image_count}"
            )
        if has_mask and not family.supports_mask:
            raise InvalidImageError(f"masks are not supported by model {model.name} ({model.architecture})", "mask")

    def open_inputs(
        self, images: list[ImageSource], mask: ImageSource | None
    ) -> tuple[list[Image.Image], Image.Image | None]:
        """Check the count, then the pixel limits from the headers, then decode. Blocking: run it off the loop."""
        self.check_inputs(len(images), mask is not None)
        return open_inputs(images, mask, self.args)

    async def read_inputs(
        self, params: OmniDiffusionSamplingParams, images: list[BinaryIO], mask: BinaryIO | None
    ) -> tuple[list[ImageSource], ImageSource | None]:
        """Admission before work for an edit's uploads: the parameters and the number of images first, then each
        header against the pixel limits, then the pixels, decoded in a worker thread."""
        self.check_params(params)
        self.check_inputs(len(images), mask is not None)
        decoded, decoded_mask = await asyncio.to_thread(self.open_inputs, list(images), mask)
        return list(decoded), decoded_mask

    @property
    def accepting(self) -> bool:
        """False once `begin_shutdown` or `shutdown` was called: new requests are refused."""
        return self._accepting

    @property
    def running_request_id(self) -> str | None:
        running = self._running
        return running[0].request_id if running else None

    @property
    def seconds_since_progress(self) -> float | None:
        """None while idle; else seconds since the running request last advanced (it started or ended a step)."""
        progress_at = self._progress_at
        return None if progress_at is None else max(0.0, time.monotonic() - progress_at)

    # -- preparing requests --------------------------------------------------------------------
    def prepare(
        self,
        prompt: str | dict[str, Any] | PromptInput,
        params: OmniDiffusionSamplingParams | None = None,
        *,
        num_previews: int = 0,
    ) -> GenerationRequest:
        """Resolve a prompt and params against the loaded model and the limits; bad input raises an
        InvalidParameterError (a ValueError naming the parameter) here, before anything is queued."""
        prompt = PromptInput.from_user(prompt)
        params = params or OmniDiffusionSamplingParams()
        defaults = self.model.defaults
        knobs = self.check_params(params)
        images, mask = self.open_inputs(prompt.images, prompt.mask)
        width, height = self.output_size(params, images, mask is not None, knobs)
        steps, outputs = self.steps(params), params.num_outputs_per_prompt
        images_per_output = self.model.family.images_per_output(knobs)
        check_size_limits(self.args, width=width, height=height, outputs=outputs, images_per_output=images_per_output)
        return GenerationRequest(
            prompt=prompt.prompt,
            params=params,
            width=width,
            height=height,
            num_inference_steps=steps,
            true_cfg_scale=defaults.true_cfg_scale if params.true_cfg_scale is None else params.true_cfg_scale,
            negative_prompt=next(
                (n for n in (prompt.negative_prompt, params.negative_prompt) if n is not None),
                defaults.negative_prompt,
            ),
            guidance_scale=defaults.guidance_scale if params.guidance_scale is None else params.guidance_scale,
            seed=random.SystemRandom().randrange(2**32) if params.seed is None else params.seed,
            num_outputs=outputs,
            images=images,
            mask=mask,
            model_knobs=knobs,
            preview_steps=preview_steps(steps, num_previews),
        )

    def check_params(self, params: OmniDiffusionSamplingParams) -> dict[str, Any]:
        """Check what needs no input image: the model's own parameters (returned, defaults filled in), the step
        and output limits, the seed and the cache overrides. `prepare` does it first; a server can do it before it
        decodes any upload."""
        knobs = self.model_knobs(params.model_knobs)
        check_work_limits(self.args, steps=self.steps(params), outputs=params.num_outputs_per_prompt)
        check_seed(params.seed, params.num_outputs_per_prompt)
        self.check_cache_config(params.cache_config)
        return knobs

    def steps(self, params: OmniDiffusionSamplingParams) -> int:
        return params.num_inference_steps or self.model.defaults.num_inference_steps

    def model_knobs(self, values: dict[str, Any]) -> dict[str, Any]:
        """The model-only parameters of a request, validated by the model's family, its defaults filled in."""
        family, architecture = self.model.family, self.model.architecture
        declared = {} if family.knobs is None else family.knobs.model_fields
        for name in values:
            if name in declared:
                continue
            takers = architectures_with_knob(name)
            if takers:
                raise InvalidParameterError(f"{name} only applies to {', '.join(takers)}, not {architecture}", name)
            valid = f"; {architecture} also takes: {', '.join(declared)}" if declared else ""
            raise InvalidParameterError(f"unknown parameter {name!r}{valid}", name)
        if family.knobs is None:
            return {}
        try:
            knobs = family.knobs.model_validate({**self.model.knob_defaults, **values}).model_dump()
        except ValidationError as error:
            raise parameter_error(error, family.knobs) from None
        try:
            family.check_knobs(self.model.pipeline, knobs)
        except KnobValueError as error:
            raise InvalidParameterError(str(error), error.name) from None
        return knobs

    def output_size(
        self, params: OmniDiffusionSamplingParams, images: list[Image.Image], masked: bool, knobs: dict[str, Any]
    ) -> tuple[int, int]:
        """The output size by the model's size rules (a size the model cannot make is refused, naming size)."""
        model = self.model
        try:
            return model.family.output_size(
                model.pipeline,
                params.size,
                images,
                masked=masked,
                knobs=knobs,
                default=model.default_size,
                max_pixels=self.args.max_image_pixels,
            )
        except ValueError as error:
            raise InvalidParameterError(str(error), "size") from None

    def check_cache_config(self, overrides: dict[str, Any] | None) -> None:
        try:
            self.cache.check_overrides(overrides)
        except ValueError as error:
            raise InvalidParameterError(str(error), "cache_config") from None

    # -- running -------------------------------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        *,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        block: bool = False,
    ) -> RequestHandle:
        """Queue a prepared request. With block=False a full queue raises QueueFullError."""
        if not self._accepting:
            raise EngineStoppedError("the engine is shutting down and takes no new requests")
        handle = RequestHandle(request, on_progress)
        self._active[request.request_id] = handle
        try:
            self._queue.put(handle, block=block)
        except queue.Full:
            del self._active[request.request_id]
            retry_after = max(1, math.ceil(self._seconds_per_request * (self.queue_depth + 1)))
            raise QueueFullError(
                f"the server is busy: {self.max_queue_size} requests are already waiting; retry in {retry_after} s",
                retry_after=retry_after,
            ) from None
        return handle

    def cancel(self, request_id: str) -> bool:
        handle = self._active.get(request_id)
        if handle is None:
            return False
        handle.cancel()
        return True

    async def start(
        self,
        prompt: str | dict[str, Any] | PromptInput,
        params: OmniDiffusionSamplingParams | None = None,
        *,
        num_previews: int = 0,
        request_id: str | None = None,
        progress: bool = False,
    ) -> LocalGeneration:
        """`prepare` and `submit` in one step (refusals raise here); input images still encoded are decoded in a
        worker thread. With progress=True the generation's `events` carry the progress events too."""
        prompt = PromptInput.from_user(prompt)
        if prompt.images or prompt.mask is not None:
            request = await asyncio.to_thread(self.prepare, prompt, params, num_previews=num_previews)
        else:
            request = self.prepare(prompt, params, num_previews=num_previews)
        if request_id is not None:
            request.request_id = request_id
        return LocalGeneration(self, request, progress=progress)

    async def generate(
        self, request: GenerationRequest, *, on_progress: Callable[[ProgressEvent], None] | None = None
    ) -> RequestOutput:
        """Run a prepared request; cancelling the awaiting task cancels the request."""
        return await _output(self.submit(request, on_progress=on_progress))

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProgressEvent | RequestOutput]:
        """Submit the request now, then iterate over its progress events and finally its output.

        Submitting before the first iteration lets a caller answer a full queue (QueueFullError) or a stopping
        engine (EngineStoppedError) before it commits to a streamed answer. Leaving the iteration cancels the request.
        """
        return LocalGeneration(self, request, progress=True).events()

    def _serve(self) -> None:
        try:
            while True:
                handle = self._queue.get()
                if handle is None:
                    self._queue.task_done()
                    return
                batch = [handle]
                answers: list[Callable[[], None]] = []
                try:
                    batch += self._take_partners(handle)
                    with self._run_lock:
                        answers = self._run(batch)
                finally:
                    for _ in batch:  # before the callers hear back: they then find the engine idle
                        self._queue.task_done()
                    for answer in answers:
                        answer()
                    for member in batch:
                        if not member.future.done():  # something beyond Exception escaped: never leave one waiting
                            member.future.set_exception(GenerationError("the model worker stopped"))
                        self._active.pop(member.request_id, None)
        finally:
            if not self._stopped:
                logger.critical("the model worker stopped unexpectedly; the engine takes no more requests")
                self.begin_shutdown()

    def _take_partners(self, first: RequestHandle) -> list[RequestHandle]:
        """Queued requests that can run in one batch with `first` (same `batch_key`), up to max_batch_size in all,
        taken out of the queue in order.

        Under load it waits up to batch_wait_ms for as many partners as the previous batch had: the clients it just
        answered are sending their next requests. A request that ran alone last time (no concurrent load) waits for
        none, so a lone client never pays the wait."""
        limit = self.args.max_batch_size - 1
        key = self._worker.batch_key(first.request) if limit > 0 else None
        if key is None:
            return []
        expected = min(limit, self._last_batch_size - 1)
        deadline = time.monotonic() + self.args.batch_wait_ms / 1000
        partners: list[RequestHandle] = []
        queued = self._queue
        with queued.mutex:
            while True:
                for handle in list(queued.queue):
                    if len(partners) == limit:
                        break
                    if handle is not None and self._worker.batch_key(handle.request) == key:
                        queued.queue.remove(handle)
                        partners.append(handle)
                left = deadline - time.monotonic()
                if len(partners) >= expected or left <= 0 or None in queued.queue:
                    break
                queued.not_empty.wait(left)
            if partners:
                queued.not_full.notify(len(partners))
        return partners

    def _run(self, batch: list[RequestHandle]) -> list[Callable[[], None]]:
        """Run a batch of requests; returns what answers their callers (called once the worker is done)."""
        if not self._accepting:
            return [functools.partial(self._refuse, handle) for handle in batch]  # queued while shutdown began
        running = [handle for handle in batch if handle.future.set_running_or_notify_cancel()]  # else cancelled
        if not running:
            return []
        self._last_batch_size = len(running)
        self._running = running
        self._progress_at = time.monotonic()
        started = time.perf_counter()
        members = [
            BatchMember(
                handle.request,
                check_stop=self._stop_check(handle),
                on_progress=functools.partial(self._advance, handle),
                queue_seconds=started - handle.submitted_at,
            )
            for handle in running
        ]
        try:
            outputs: list[RequestOutput | Exception] = self._worker.run_batch(members)
        except Exception as error:  # a failing batch fails alone; the worker goes on
            outputs = [error] * len(running)
        finally:
            self._progress_at = None
            self._running = []
            elapsed = (time.perf_counter() - started) / len(running)
            self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * elapsed
        return [self._answer(handle, output) for handle, output in zip(running, outputs, strict=True)]

    def _answer(self, handle: RequestHandle, output: RequestOutput | Exception) -> Callable[[], None]:
        if isinstance(output, Exception):
            failure = self._failure(handle.request_id, output)
            return lambda: handle.future.set_exception(failure)
        return lambda: handle.future.set_result(output)

    def _stop_check(self, handle: RequestHandle) -> Callable[[], None]:
        """What the worker calls between steps and inside them: raises once the request must stop."""
        timeout = self.args.request_timeout
        deadline = None if timeout is None else time.monotonic() + timeout

        def check_stop() -> None:
            if handle.cancel_requested or self._stopped:
                raise RequestCancelledError(f"request {handle.request_id} was cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeoutError(
                    f"request {handle.request_id} ran past its deadline of {timeout:g} s and was stopped; ask for "
                    "fewer steps or pixels (the server's request_timeout, --request-timeout, sets the deadline)"
                )

        return check_stop

    @staticmethod
    def _failure(request_id: str, error: Exception) -> Exception:
        """The exception a failed request's future gets: cancellations and deadlines as they are, device
        memory exhaustion as DeviceOutOfMemoryError, anything else as a GenerationError whose message carries no
        internal text (the traceback goes to the log with the request id)."""
        if isinstance(error, RequestCancelledError | RequestTimeoutError):
            logger.info("request %s stopped: %s", request_id, error)
            return error
        failure: GenerationError
        if isinstance(error, torch.OutOfMemoryError):
            logger.error("request %s ran out of device memory", request_id, exc_info=error)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            failure = DeviceOutOfMemoryError(
                f"request {request_id} ran out of device memory; retry later, or ask for fewer or smaller images"
            )
        else:
            logger.error("request %s failed", request_id, exc_info=error)
            failure = GenerationError(f"generation of request {request_id} failed; the server log has the details")
        failure.__cause__ = error
        return failure

    def _advance(self, handle: RequestHandle, event: ProgressEvent) -> None:
        self._progress_at = time.monotonic()
        handle.emit(event)

    # -- shutting down -------------------------------------------------------------------------
    def _refuse(self, handle: RequestHandle) -> None:
        """Answer a request that will never run because the engine is shutting down."""
        if handle.future.set_running_or_notify_cancel():  # False: its caller cancelled it already
            handle.future.set_exception(EngineStoppedError("the engine shut down before the request started"))
        self._active.pop(handle.request_id, None)

    def _refuse_waiting(self) -> bool:
        """Refuse every queued request; True if the worker's stop marker was among them (it is not consumed)."""
        saw_stop_marker = False
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                return saw_stop_marker
            self._queue.task_done()
            if handle is None:
                saw_stop_marker = True
            else:
                self._refuse(handle)

    def begin_shutdown(self) -> None:
        """Take no new request and fail the waiting ones with EngineStoppedError; the running one goes on.

        Thread-safe and non-blocking: any thread, the event loop included, may call it. `shutdown` ends the worker.
        """
        self._accepting = False
        if self._refuse_waiting():
            self._queue.put_nowait(None)  # the queue was just emptied: there is room

    def shutdown(self, *, wait: bool = True) -> None:
        """Take no new request, fail the waiting ones (EngineStoppedError), cancel the running one at its next
        step and stop the worker; with wait=True, until its thread has ended (see `wait_stopped` for asyncio)."""
        if not self._stopped:
            self._accepting = False
            self._stopped = True
            while True:  # requests submitted while shutdown began are refused too, then the stop marker goes in
                self._refuse_waiting()
                try:
                    self._queue.put_nowait(None)
                    break
                except queue.Full:
                    continue
        if wait:
            self._thread.join()

    async def wait_stopped(self, timeout: float | None = None) -> bool:
        """Wait, without blocking the event loop, until the worker thread has ended (after `shutdown`).

        Returns False if it still runs after `timeout` seconds: a step that never returns keeps it busy, and the
        thread, a daemon, then ends with the process.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True


class LocalGeneration:
    """A request queued on an AsyncEngine of this process (see `AsyncEngine.start`)."""

    def __init__(self, engine: AsyncEngine, request: GenerationRequest, *, progress: bool):
        self.request = request
        self._events: asyncio.Queue[ProgressEvent] = asyncio.Queue()
        on_progress = None
        if progress:
            loop = asyncio.get_running_loop()

            def on_progress(event: ProgressEvent) -> None:  # called on the worker thread
                loop.call_soon_threadsafe(self._events.put_nowait, event)

        self.handle = engine.submit(request, on_progress=on_progress)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def width(self) -> int:
        return self.request.width

    @property
    def height(self) -> int:
        return self.request.height

    async def events(self) -> AsyncGenerator[ProgressEvent | RequestOutput, None]:
        handle, events = self.handle, self._events
        finished: asyncio.Future[Any] = asyncio.wrap_future(handle.future)
        try:
            while True:
                next_event: asyncio.Future[Any] = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({next_event, finished}, return_when=asyncio.FIRST_COMPLETED)
                if next_event in done:
                    yield next_event.result()
                    continue
                next_event.cancel()
                while not events.empty():
                    yield events.get_nowait()
                yield finished.result()
                return
        finally:
            if not handle.future.done():
                handle.cancel()

    async def output(self) -> RequestOutput:
        return await _output(self.handle)

    def cancel(self) -> None:
        self.handle.cancel()


async def _output(handle: RequestHandle) -> RequestOutput:
    """A submitted request's output; cancelling the awaiting task cancels the request."""
    try:
        return await asyncio.wrap_future(handle.future)
    except asyncio.CancelledError:
        handle.cancel()
        raise


def check_settings_before_loading(
    name: str, profile_settings: dict[str, Any] | None, user_settings: dict[str, Any] | None
) -> None:
    """Refuse bad cache settings before a long load. The model folder's settings are not known yet, and a
    quality_target may rely on the quality_table there, so the target's value alone is checked."""
    backend = CACHE_BACKENDS[name]
    settings = dict(backend.merge_settings(profile_settings, user_settings))
    target = settings.pop(QUALITY_TARGET, None)
    if target is not None:
        check_quality_target(target)
    backend.from_config(settings)


def preview_steps(num_steps: int, count: int) -> frozenset[int]:
    """`count` 0-based steps spread evenly over the run, the last step excluded (that image is the final one)."""
    if count <= 0 or num_steps < 2:
        return frozenset()
    return frozenset(min(num_steps - 2, (num_steps * (k + 1)) // (count + 1)) for k in range(count))
