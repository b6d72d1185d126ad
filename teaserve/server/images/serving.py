"""The logic behind /v1/images/generations and /v1/images/edits."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.background import BackgroundTask
from starlette.datastructures import FormData

from ...engine import (
    EngineClient,
    EngineStoppedError,
    Generation,
    InvalidParameterError,
    OmniDiffusionSamplingParams,
    ProgressEvent,
    PromptInput,
    RequestOutput,
    SamplingFields,
)
from ...engine.params import parse_size
from ...engine.request import new_request_id
from ..errors import OpenAIError, engine_error
from ..forms import FormParts, read_form
from ..lifecycle import ServerLifecycle
from ..metrics import ServerMetrics
from ..models import check_model_name
from .protocol import ImageData, ImageEditRequest, ImageGenerationRequest, ImageRequestFields, ImagesResponse

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_INPUT_IMAGES = 16
"""Files accepted in one edit request (OpenAI's limit); the model may take fewer."""
MAX_FORM_FIELD_BYTES = 1024 * 1024
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class ClientDisconnectedError(Exception):
    """The client went away before its answer was ready."""


ABANDONED_MESSAGE = "the server stopped waiting for the request at the end of its shutdown grace period"


async def cancel_on_disconnect(request: Request, work: Awaitable[T], abandoned: asyncio.Event) -> T:
    """Await `work`, cancelling it as soon as the client disconnects (the body must have been read) or the server
    abandons waiting requests (then EngineStoppedError). Cancelling the caller cancels `work` too: a proxy in front
    may cancel the handler of a client that went away."""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watchers = {asyncio.ensure_future(wait_for_disconnect()), asyncio.ensure_future(abandoned.wait())}
    try:
        done, _ = await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    if abandoned.is_set():
        raise EngineStoppedError(ABANDONED_MESSAGE)
    raise ClientDisconnectedError


async def until_abandoned(items: AsyncIterator[T], abandoned: asyncio.Event) -> AsyncIterator[T]:
    """Yield from `items` until they end, or raise EngineStoppedError once the server abandons waiting requests."""
    stop = asyncio.ensure_future(abandoned.wait())
    following: asyncio.Future[T] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(items))
            await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                raise EngineStoppedError(ABANDONED_MESSAGE)
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()
        if following is not None:
            following.cancel()  # a pending step of the iterator: cancelling it closes the iterator and its request


def encode_image(image: Image.Image, output_format: str, compression: int | None) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        if output_format == "jpeg" and image.mode != "RGB":
            image = image.convert("RGB")
        image.save(buffer, format=PIL_FORMATS[output_format], quality=100 if compression is None else compression)
    return buffer.getvalue()


def encode_b64(image: Image.Image, output_format: str, compression: int | None) -> str:
    return base64.b64encode(encode_image(image, output_format, compression)).decode()


def _bad_request(error: InvalidParameterError) -> OpenAIError:
    return OpenAIError(400, str(error), param=error.param)


EDIT_FILE_FIELDS = {"image": "image", "image[]": "image", "mask": "mask"}


def parse_edit_form(form: FormData) -> FormParts:
    """An edit's parts: one or more images, at most one mask (see `FormParts.parse`)."""
    parts = FormParts.parse(form, EDIT_FILE_FIELDS)
    if not parts.files["image"]:
        raise OpenAIError(400, "an edit needs at least one input image (field image or image[])", param="image")
    if len(parts.files["mask"]) > 1:
        raise OpenAIError(400, "give at most one mask", param="mask")
    return parts


class ImageServing:
    """Turns OpenAI image requests into engine requests and engine outputs into OpenAI responses."""

    def __init__(
        self, engine: EngineClient, model_names: list[str], metrics: ServerMetrics, lifecycle: ServerLifecycle
    ):
        self.engine = engine
        self.lifecycle = lifecycle
        self.served_model_name = model_names[0]
        self.model_names = model_names
        self.metrics = metrics

    # -- entry points --------------------------------------------------------------------------------------
    async def generate(self, body: ImageGenerationRequest, request: Request) -> Response:
        try:
            params = self._params(body)
        except InvalidParameterError as error:
            raise _bad_request(error) from None
        return await self._serve("image_generation", PromptInput(body.prompt), body, params, request)

    async def edit(self, request: Request) -> Response:
        """The uploads go to the engine's `read_inputs` while they are open. Admission before work: an engine in
        this process checks the text fields and the number of image and mask parts against the model before any
        upload is read, the images' headers against the pixel limits before any pixel is decoded, and decodes in a
        worker thread."""
        form = await read_form(request, max_files=MAX_INPUT_IMAGES + 1, max_part_size=MAX_FORM_FIELD_BYTES)
        try:
            parts = parse_edit_form(form)
            body = parts.body(ImageEditRequest)
            images_given, masks = parts.files["image"], parts.files["mask"]
            try:
                params = self._params(body)
                images, mask = await self.engine.read_inputs(
                    params,
                    [upload.file for upload in images_given],
                    masks[0].file if masks else None,
                )
            except InvalidParameterError as error:
                raise _bad_request(error) from None
        finally:
            await form.close()
        prompt = PromptInput(body.prompt, images=images, mask=mask)
        return await self._serve("image_edit", prompt, body, params, request)

    # -- shared path -------------------------------------------------------------------------------------------
    def _params(self, body: ImageRequestFields) -> OmniDiffusionSamplingParams:
        check_model_name(body.model, self.model_names)
        model = self.engine.served_model
        if model.makes_video:
            raise OpenAIError(
                400,
                f"model {self.served_model_name} ({model.architecture}) makes videos, not images: create them with "
                "POST /v1/videos (client.videos.create)",
                param="model",
            )
        if body.response_format == "url":
            raise OpenAIError(
                400,
                "response_format 'url' is not supported: images are returned inline, use b64_json",
                param="response_format",
            )
        if body.background == "transparent" and body.output_format == "jpeg":
            raise OpenAIError(400, "a transparent background needs output_format png or webp", param="background")
        width, height = (None, None) if body.size in (None, "auto") else parse_size(body.size)
        return OmniDiffusionSamplingParams(
            **{name: getattr(body, name) for name in SamplingFields.model_fields},
            num_outputs_per_prompt=body.n,
            width=width,
            height=height,
            model_knobs=body.model_knobs,
        )

    async def _serve(
        self,
        kind: str,
        prompt: PromptInput,
        body: ImageRequestFields,
        params: OmniDiffusionSamplingParams,
        request: Request,
    ) -> Response:
        # the X-Request-Id we created is a fresh uuid: use it throughout; a client's own id may not be unique
        request_id = new_request_id() if request.state.client_request_id else request.state.request_id
        start = self.engine.start(
            prompt,
            params,
            num_previews=body.partial_images if body.stream else 0,
            request_id=request_id,
            progress=body.stream,
        )
        try:
            if body.stream:
                # Admission first (bad input: 400, queue full: 429, shutting down: 503), then the 200 that starts
                # the stream.
                generation = await cancel_on_disconnect(request, start, self.lifecycle.abandoned)
            else:
                output = await cancel_on_disconnect(request, _output(start), self.lifecycle.abandoned)
        except ClientDisconnectedError:
            return Response(status_code=499)  # nobody reads it; the generation was cancelled
        except InvalidParameterError as error:  # refused before any work
            raise _bad_request(error) from None
        except Exception as error:
            raise engine_error(error, request_id) from None
        if body.stream:
            return StreamingResponse(
                self._events(kind, generation, body),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
                # a client gone before the first event never starts the iteration that would cancel the request
                background=BackgroundTask(generation.cancel),
            )
        self.metrics.record_output(output)
        data = await asyncio.to_thread(self._encode_all, output, body)
        response = ImagesResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=b64, seed=seed) for b64, seed in data],
            background=self._background(output.images),
            output_format=body.output_format,
            size=f"{output.width}x{output.height}",
            quality=body.quality,
            id=output.request_id,
            model=self.served_model_name,
            metrics=_metrics(output),
            cache=output.metrics.cache,
        )
        return JSONResponse(response.model_dump())

    @staticmethod
    def _encode_all(output: RequestOutput, body: ImageRequestFields) -> list[tuple[str, int]]:
        seeds = output.seeds
        per_seed = max(1, len(output.images) // len(seeds))  # layered models return several images per seed
        return [
            (
                encode_b64(image, body.output_format, body.output_compression),
                seeds[min(index // per_seed, len(seeds) - 1)],
            )
            for index, image in enumerate(output.images)
        ]

    @staticmethod
    def _background(images: list[Image.Image]) -> Literal["transparent", "opaque"]:
        return "transparent" if any(image.mode in ("RGBA", "LA") for image in images) else "opaque"

    async def _events(self, kind: str, generation: Generation, body: ImageRequestFields) -> AsyncIterator[str]:
        size = f"{generation.width}x{generation.height}"
        common = {"output_format": body.output_format, "quality": body.quality or "auto", "size": size}
        partial_index = 0
        try:
            async for item in until_abandoned(generation.events(), self.lifecycle.abandoned):
                if isinstance(item, ProgressEvent):
                    if body.stream_progress:
                        progress = {"type": f"{kind}.progress", "step": item.step, "num_steps": item.total}
                        yield _sse(f"{kind}.progress", progress)
                    for preview in item.previews or []:
                        b64 = await asyncio.to_thread(encode_b64, preview, body.output_format, body.output_compression)
                        yield _sse(
                            f"{kind}.partial_image",
                            {
                                "type": f"{kind}.partial_image",
                                "b64_json": b64,
                                "created_at": int(time.time()),
                                "partial_image_index": partial_index,
                                "background": self._background([preview]),
                                **common,
                            },
                        )
                        partial_index += 1
                    continue
                self.metrics.record_output(item)
                data = await asyncio.to_thread(self._encode_all, item, body)
                for b64, seed in data:
                    yield _sse(
                        f"{kind}.completed",
                        {
                            "type": f"{kind}.completed",
                            "b64_json": b64,
                            "created_at": int(time.time()),
                            "background": self._background(item.images),
                            "seed": seed,
                            "id": item.request_id,
                            "metrics": _metrics(item),
                            "cache": item.metrics.cache,
                            **common,
                        },
                    )
        except Exception as error:  # the status line has gone out: report the failure in the stream
            yield f"data: {json.dumps(engine_error(error, generation.request_id).body())}\n\n"


async def _output(start: Awaitable[Generation]) -> RequestOutput:
    return await (await start).output()


def _sse(event: str, payload: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n"


def _metrics(output: RequestOutput) -> dict[str, Any]:
    metrics = output.metrics
    return {
        "queue_seconds": round(metrics.queue_seconds, 4),
        "seconds": round(metrics.seconds, 4),
        "num_inference_steps": metrics.num_inference_steps,
        "steps": metrics.steps,
        "transformer_calls": metrics.transformer_calls,
        "batch_size": metrics.batch_size,
    }
