"""The logic behind /v1/videos: admission, each job's life from the engine's queue to its files, and the answers.

A job is checked completely before anything is stored: a refused request leaves no trace. Once the engine has taken
it, the job is a row in the store and a task here that waits for the engine, encodes the video (in a worker thread)
and writes the files. The store runs on a thread of its own, one call at a time, so the event loop never waits on
SQLite or the disk and the job task and a DELETE never interleave.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import io
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import ValidationError

from ...engine import (
    AsyncEngine,
    GeneratedVideo,
    InvalidImageError,
    InvalidParameterError,
    OmniDiffusionSamplingParams,
    ProgressEvent,
    PromptInput,
    RequestCancelledError,
    RequestHandle,
    SamplingFields,
)
from ...engine.params import parse_size, shown_value
from ...pipelines import VideoKnobs
from ..errors import OpenAIError, _validation_message, engine_error, internal_error
from ..forms import FormParts, read_form
from ..metrics import ServerMetrics
from ..models import check_model_name
from .protocol import (
    FINAL_STATUSES,
    VARIANT_MEDIA_TYPES,
    ImageReference,
    Video,
    VideoCreateRequest,
    VideoDeleted,
    VideoError,
    VideoList,
)
from .store import VARIANT_FILES, VIDEO_ID, VideoRecord, VideoStore, default_data_dir, new_video_id

logger = logging.getLogger(__name__)

T = TypeVar("T")

POLL_AFTER_HEADER = "openai-poll-after-ms"
DEFAULT_POLL_AFTER_MS, MIN_POLL_AFTER_MS, MAX_POLL_AFTER_MS = 500, 100, 2000
MAX_FORM_PART_BYTES = 32 * 1024 * 1024
"""Largest text part of a form: `input_reference[image_url]` carries a whole image as a data: URL."""
JOB_SAVE_TIMEOUT = 30.0
"""Seconds a closing server waits for its jobs to write their results; a job cut off fails at the next start."""
RESTARTED_MESSAGE = "the server restarted before this video was finished; submit it again"
CONTENT_CHUNK_BYTES = 1024 * 1024
_DATA_URL = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[^,;]*)*?);base64,(.*)", re.DOTALL)


class LiveJob:
    """A job of this process that has not ended: how far the engine has got, and when to look again."""

    def __init__(self, video_id: str, loop: asyncio.AbstractEventLoop, on_first_step: Callable[[], None]):
        self.video_id = video_id
        self._on_first_step = on_first_step
        self.handle: RequestHandle | None = None
        self.stored: asyncio.Future[None] = loop.create_future()
        """Done once the job's row is in the store (or failed to go in)."""
        self.progress = 0
        self._first_step: tuple[float, int] | None = None
        self._seconds_per_step: float | None = None
        self._steps_left = 0

    def on_progress(self, event: ProgressEvent) -> None:
        """Called on the engine's worker thread after each step; it only sets numbers that GETs read."""
        now = time.monotonic()
        if self._first_step is None:
            self._first_step = (now, event.step)
            self._on_first_step()
        elif event.step > self._first_step[1]:
            self._seconds_per_step = (now - self._first_step[0]) / (event.step - self._first_step[1])
        self._steps_left = event.total - event.step
        self.progress = min(99, 100 * event.step // event.total)  # 100 once the files are written

    @property
    def started(self) -> bool:
        future = None if self.handle is None else self.handle.future
        return future is not None and (future.running() or future.done())

    def poll_after_ms(self) -> int:
        """Half the time the job should still take, within bounds: clients look again before it ends."""
        if self._seconds_per_step is None:
            return DEFAULT_POLL_AFTER_MS
        remaining_ms = 1000 * self._seconds_per_step * max(1, self._steps_left)
        return int(min(MAX_POLL_AFTER_MS, max(MIN_POLL_AFTER_MS, remaining_ms / 2)))


def encode_video_files(video: GeneratedVideo) -> dict[str, bytes]:
    """The files of every content variant (CPU work: run it in a worker thread)."""
    thumbnail, spritesheet = io.BytesIO(), io.BytesIO()
    video.thumbnail().save(thumbnail, format="PNG")
    video.spritesheet().save(spritesheet, format="JPEG", quality=90)
    files = {"video": video.mp4(), "thumbnail": thumbnail.getvalue(), "spritesheet": spritesheet.getvalue()}
    return {VARIANT_FILES[variant]: data for variant, data in files.items()}


def data_url_bytes(url: str) -> bytes:
    """The bytes of a base64 data: URL. Nothing else is accepted: the server never fetches a URL or reads a path."""
    match = _DATA_URL.fullmatch(url.strip())
    if match is None:
        raise InvalidImageError(
            "input_reference image_url must be a base64 data: URL (data:image/png;base64,...), got "
            f"{shown_value(url[:60])}; this server fetches no URL and reads no path: send the image inline or as "
            "the input_reference file part",
            "input_reference",
        )
    try:
        return base64.b64decode(match[3], validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidImageError(f"input_reference image_url is not valid base64: {error}", "input_reference") from None


def open_reference(reference: BinaryIO | str, engine: AsyncEngine) -> list[Image.Image]:
    """The decoded input image of an image-to-video request: an uploaded file, or the text of a data: URL (never a
    path). Blocking: it decodes base64 and pixels."""
    source = data_url_bytes(reference) if isinstance(reference, str) else reference
    images, _ = engine.open_inputs([source], None)
    return images


class VideoServing:
    """Turns Videos API requests into engine requests, and keeps their jobs in a `VideoStore`.

    On a model that makes images every route answers 400, and no store is opened.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        model_names: list[str],
        metrics: ServerMetrics,
        data_dir: str | Path | None = None,
    ):
        self.engine = engine
        self.model_names = model_names
        self.served_model_name = model_names[0]
        self.metrics = metrics
        self.store: VideoStore | None = None
        self._live: dict[str, LiveJob] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        family = engine.model.family
        if not family.makes_video:
            return
        if family.knobs is None or not issubclass(family.knobs, VideoKnobs):
            raise TypeError(f"{engine.model.architecture} makes videos but declares no VideoKnobs")
        self.knobs: type[VideoKnobs] = family.knobs
        self.default_fps = int(engine.model_knobs({})["fps"])
        # Opened before the server starts (no event loop waits): a data directory another server holds stops it.
        self.store = VideoStore(data_dir or default_data_dir())
        restarted = self.store.recover(RESTARTED_MESSAGE)
        if restarted:
            logger.warning("%d video job(s) left unfinished by the previous run are failed", len(restarted))
            self.metrics.video_jobs.labels("failed").inc(len(restarted))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teaserve-videos")

    # -- the store's thread ------------------------------------------------------------------------------------
    async def _stored(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, *args)

    def _video_store(self) -> VideoStore:
        """The store, on a model that makes videos; else the 400 every route answers."""
        if self.store is None:
            model = self.engine.model
            raise OpenAIError(
                400,
                f"model {self.served_model_name} ({model.architecture}) makes images, not videos: use "
                "POST /v1/images/generations or /v1/images/edits",
                param="model",
            )
        return self.store

    # -- creating ----------------------------------------------------------------------------------------------
    async def create(self, request: Request) -> Response:
        """Admission before work: every field is checked against the model before the input reference is decoded
        (in a worker thread); nothing is stored until the engine has taken the job."""
        store = self._video_store()
        try:
            body, reference = await self._read_request(request)
            check_model_name(body.model, self.model_names)
            try:
                params = self._params(body)
                self.engine.check_params(params)
                self._check_reference(reference is not None)
                images = [] if reference is None else await asyncio.to_thread(open_reference, reference, self.engine)
                prepared = self.engine.prepare(PromptInput(body.prompt, images=list(images)), params)
            except InvalidParameterError as error:
                raise OpenAIError(400, str(error), param=_wire_param(error.param, body)) from None
        finally:
            await request.close()  # the form's uploads
        video_id = prepared.request_id = new_video_id()
        knobs = prepared.model_knobs
        if body.seconds is not None and "num_frames" not in body.model_knobs:
            seconds = f"{body.seconds:g}"
        else:
            seconds = f"{round(knobs['num_frames'] / knobs['fps'], 3):g}"
        record = VideoRecord(
            id=video_id,
            model=self.served_model_name,
            status="queued",
            prompt=body.prompt,
            seconds=seconds,
            size=f"{prepared.width}x{prepared.height}",
            num_frames=knobs["num_frames"],
            fps=knobs["fps"],
            seed=prepared.seed,
            progress=0,
            created_at=int(time.time()),
        )
        job = LiveJob(video_id, asyncio.get_running_loop(), functools.partial(self._mark_in_progress, store, video_id))
        try:
            job.handle = self.engine.submit(prepared, on_progress=job.on_progress)
        except Exception as error:  # a full queue (429), a server shutting down (503): nothing was stored
            raise engine_error(error, video_id) from None
        self._live[video_id] = job
        task = asyncio.create_task(self._follow(job, store, record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(job.stored)
        return self._answer(self._video(record))

    async def _read_request(self, request: Request) -> tuple[VideoCreateRequest, BinaryIO | str | None]:
        """The body (multipart as the SDK sends it, a urlencoded form, or JSON) and the input reference: an
        uploaded file, or the text of a data: URL (decoded later, off the event loop)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/json":
            return self._json_request(await request.body())
        if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise OpenAIError(400, "send the request as multipart/form-data (as the OpenAI SDK does) or as JSON")
        form = await read_form(request, max_files=2, max_part_size=MAX_FORM_PART_BYTES)
        parts = FormParts.parse(form, {"input_reference": "input_reference"})
        fields = {
            name: parts.fields.pop(f"input_reference[{name}]")
            for name in ImageReference.model_fields
            if f"input_reference[{name}]" in parts.fields
        }
        body = parts.body(VideoCreateRequest)
        uploads = parts.files["input_reference"]
        if len(uploads) + bool(fields) > 1:
            raise OpenAIError(400, "give input_reference once: a file part or a data: URL", param="input_reference")
        if uploads:
            return body, uploads[0].file  # open until `create` closes the request
        return body, _reference_url(ImageReference(**fields) if fields else None)

    @staticmethod
    def _json_request(raw: bytes) -> tuple[VideoCreateRequest, str | None]:
        try:
            body = VideoCreateRequest.model_validate_json(raw or b"null")
        except ValidationError as error:
            message, param = _validation_message(dict(error.errors()[0]))
            raise OpenAIError(400, message, param=param) from None
        return body, _reference_url(body.input_reference)

    def _params(self, body: VideoCreateRequest) -> OmniDiffusionSamplingParams:
        """The sampling parameters, with `seconds` turned into a frame count at the request's frame rate (an
        explicit num_frames wins)."""
        knobs = body.model_knobs
        if body.seconds is not None and "num_frames" not in knobs:
            fps = self.engine.model_knobs({"fps": knobs["fps"]})["fps"] if "fps" in knobs else self.default_fps
            frames = self.knobs.frames_for(body.seconds, fps)
            try:
                self.engine.model_knobs({"fps": fps, "num_frames": frames})
            except InvalidParameterError as error:
                raise InvalidParameterError(
                    f"{body.seconds:g} seconds at {fps} fps make {frames} frames: {error}", "seconds"
                ) from None
            knobs = {**knobs, "num_frames": frames}
        width, height = (None, None) if body.size is None else parse_size(body.size)
        return OmniDiffusionSamplingParams(
            **{name: getattr(body, name) for name in SamplingFields.model_fields},
            width=width,
            height=height,
            model_knobs=knobs,
        )

    def _check_reference(self, given: bool) -> None:
        family = self.engine.model.family
        name = f"model {self.served_model_name} ({self.engine.model.architecture})"
        if given and family.max_input_images == 0:
            raise InvalidImageError(
                f"{name} makes videos from text only and takes no input_reference; image-to-video needs an "
                "image-to-video model",
                "input_reference",
            )
        if not given and family.min_input_images > 0:
            raise InvalidImageError(
                f"{name} makes videos from an image: send its first frame as input_reference", "input_reference"
            )

    def _mark_in_progress(self, store: VideoStore, video_id: str) -> None:
        """Store that a job has begun (called on the engine's worker thread after its first step: submitted before
        the engine answers, the write lands before the job's end is stored)."""
        with contextlib.suppress(RuntimeError):  # the store has closed: the next start fails the job anyway
            self._executor.submit(store.mark_in_progress, video_id)

    async def _follow(self, job: LiveJob, store: VideoStore, record: VideoRecord) -> None:
        """Store the job, wait for the engine, then store how it ended."""
        assert job.handle is not None
        try:
            try:
                await self._stored(store.insert, record)
            except Exception as error:
                job.handle.cancel()
                job.stored.set_exception(error)
                return
            job.stored.set_result(None)
            try:
                await asyncio.wrap_future(job.handle.future)
            except asyncio.CancelledError:
                if not job.handle.future.cancelled():
                    raise  # this task was cancelled: the server closes
            except Exception:
                pass  # `_finish` reads the failure from the engine's future
            ended = await self._finish(job, store)
            if ended is not None:
                self.metrics.video_jobs.labels(ended).inc()
        finally:
            self._live.pop(job.video_id, None)

    async def _finish(self, job: LiveJob, store: VideoStore) -> str | None:
        """Write a finished job's files, or its error; the status it ended with (None: it was deleted meanwhile)."""
        assert job.handle is not None
        future, video_id = job.handle.future, job.video_id
        error = RequestCancelledError(f"request {video_id} was cancelled") if future.cancelled() else future.exception()
        answer = internal_error(video_id)
        if error is None:
            output = future.result()
            self.metrics.record_output(output)
            try:
                files = await asyncio.to_thread(encode_video_files, output.videos[0])
                return "completed" if await self._stored(store.complete, video_id, files) else None
            except Exception as failure:
                logger.error("video %s could not be saved", video_id, exc_info=failure)
        elif isinstance(error, Exception):
            answer = engine_error(error, video_id)
        code = answer.code or "internal_error"
        return "failed" if await self._stored(store.fail, video_id, code, answer.message, job.progress) else None

    # -- reading -----------------------------------------------------------------------------------------------
    async def retrieve(self, video_id: str) -> Response:
        return self._answer(self._video(await self._record(video_id)))

    async def list(self, after: str | None, limit: int, order: Literal["asc", "desc"]) -> VideoList:
        store = self._video_store()
        records, has_more = await self._stored(lambda: store.page(after=after, limit=limit, order=order))
        data = [self._video(record) for record in records]
        return VideoList(
            data=data,
            has_more=has_more,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
        )

    async def content(self, video_id: str, variant: str) -> Response:
        record = await self._record(video_id)
        if record.status != "completed":
            video = self._video(record)
            if video.status == "failed":
                raise OpenAIError(
                    409,
                    f"video {video_id} failed, it has no content: {record.error_message}",
                    param="video_id",
                    code="video_failed",
                    headers={"x-should-retry": "false"},
                )
            raise OpenAIError(
                409,
                f"video {video_id} is {video.status} ({video.progress}%); its content is there once it is completed",
                param="video_id",
                code="video_not_ready",
            )
        file = await self._stored(self._video_store().open_file, video_id, VARIANT_FILES[variant])
        if file is None:
            raise _not_found(video_id)
        return StreamingResponse(
            _chunks(file),
            media_type=VARIANT_MEDIA_TYPES[variant],
            headers={"content-length": str(os.fstat(file.fileno()).st_size)},
        )

    async def delete(self, video_id: str) -> VideoDeleted:
        """Remove the job and its files; one that has not ended is cancelled (a queued one never runs)."""
        store = self._video_store()
        record = await self._stored(store.delete, video_id) if VIDEO_ID.fullmatch(video_id) else None
        if record is None:
            raise _not_found(video_id)
        job = self._live.get(video_id)
        if job is not None and job.handle is not None:
            job.handle.cancel()
        if record.status not in FINAL_STATUSES:
            self.metrics.video_jobs.labels("cancelled").inc()
        return VideoDeleted(id=video_id, deleted=True)

    async def _record(self, video_id: str) -> VideoRecord:
        store = self._video_store()
        record = await self._stored(store.get, video_id) if VIDEO_ID.fullmatch(video_id) else None
        if record is None:
            raise _not_found(video_id)
        return record

    def _video(self, record: VideoRecord) -> Video:
        """The job as the API shows it: the stored row, with the live progress of a job this process runs."""
        status, progress = record.status, record.progress
        job = self._live.get(record.id)
        if job is not None and status not in FINAL_STATUSES:
            status, progress = ("in_progress" if job.started else status), job.progress
        error = (
            None
            if record.error_code is None
            else VideoError(code=record.error_code, message=record.error_message or "")
        )
        return Video(
            id=record.id,
            model=record.model,
            status=status,  # type: ignore[arg-type]  # a stored status is one of VideoStatus
            progress=progress,
            created_at=record.created_at,
            completed_at=record.completed_at,
            prompt=record.prompt,
            seconds=record.seconds,
            size=record.size,
            error=error,
            num_frames=record.num_frames,
            fps=record.fps,
            seed=record.seed,
        )

    def _answer(self, video: Video) -> JSONResponse:
        """A job as JSON; one that has not ended tells the client when to look again."""
        headers = {}
        if video.status not in FINAL_STATUSES:
            job = self._live.get(video.id)
            headers[POLL_AFTER_HEADER] = str(job.poll_after_ms() if job is not None else DEFAULT_POLL_AFTER_MS)
        return JSONResponse(video.model_dump(), headers=headers)

    # -- closing -----------------------------------------------------------------------------------------------
    async def close(self) -> None:
        """Let the jobs whose generation has ended write their results (the engine is stopped first, so the others
        fail at once), then close the store. A job still unfinished after JOB_SAVE_TIMEOUT fails at the next
        start."""
        if self.store is None:
            return
        pending = {task for task in self._tasks if not task.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=JOB_SAVE_TIMEOUT)
        for task in pending:
            logger.warning("a video job was still saving when the server closed; it fails at the next start")
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._stored(self.store.close)
        self._executor.shutdown(wait=False)


def _reference_url(reference: ImageReference | None) -> str | None:
    if reference is None:
        return None
    if reference.file_id is not None:
        raise OpenAIError(
            400,
            "input_reference file_id is not supported: this server keeps no uploaded files; send the image as the "
            "input_reference file part or as input_reference[image_url] with a data: URL",
            param="input_reference",
        )
    if reference.image_url is None:
        raise OpenAIError(400, "input_reference needs an image_url (a data: URL)", param="input_reference")
    return reference.image_url


def _wire_param(param: str, body: VideoCreateRequest) -> str:
    """The parameter of the request an engine error is about: the engine names input images "image", and the
    frames of a request that is over the pixel limits "n"."""
    if param == "image":
        return "input_reference"
    if param == "n":
        return "num_frames" if "num_frames" in body.model_knobs else "seconds" if body.seconds is not None else "size"
    return param


def _not_found(video_id: str) -> OpenAIError:
    return OpenAIError(404, f"no video with id {video_id!r}", param="video_id", code="video_not_found")


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    """A file's bytes in chunks (starlette reads a plain iterator in a worker thread)."""
    with file:
        while chunk := file.read(CONTENT_CHUNK_BYTES):
            yield chunk
