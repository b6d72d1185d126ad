"""Model list, health, readiness, version and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from .errors import OpenAIError
from .models import check_model_name
from .protocol import CacheCard, ModelCard, ModelList

router = APIRouter()
STARTED = int(time.time())


def _model_card(request: Request) -> ModelCard:
    model, serving = request.app.state.engine.served_model, request.app.state.image_serving
    width, height = model.default_size
    return ModelCard(
        id=serving.served_model_name,
        created=STARTED,
        architecture=model.architecture,
        can_edit=model.can_edit,
        max_input_images=model.max_input_images,
        default_size=f"{width}x{height}",
        makes_video=model.makes_video,
        cache=CacheCard(**dataclasses.asdict(model.cache)),
    )


@router.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_model_card(request)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, tags=["models"])
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """The served model by any name it answers to (model ids may hold a slash)."""
    check_model_name(model, request.app.state.image_serving.model_names)
    return _model_card(request)


@router.get("/health", tags=["system"])
@router.head("/health", include_in_schema=False)
async def health(request: Request) -> Response:
    """Liveness: 200 while the process and its model worker live (a stuck or draining worker is still alive)."""
    alive = request.app.state.engine.is_alive
    return JSONResponse({"status": "ok" if alive else "dead"}, status_code=200 if alive else 503)


@router.get("/ready", tags=["system"])
@router.head("/ready", include_in_schema=False)
async def ready(request: Request) -> Response:
    """Readiness: 200 when a request sent now would be taken and worked on; 503 while shutting down, when the
    worker has stopped, or when the running request has made no progress for longer than the stall timeout."""
    lifecycle = request.app.state.lifecycle
    reason = lifecycle.unready_reason()
    body = {
        "ready": reason is None,
        "reason": reason,
        "model": request.app.state.image_serving.served_model_name,
        "seconds_since_progress": lifecycle.engine.seconds_since_progress,
    }
    return JSONResponse(body, status_code=200 if reason is None else 503)


@router.get("/version", tags=["system"])
async def version() -> dict:
    return {"version": __version__}


@router.get("/metrics", tags=["system"])
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    # Rendering walks every series: keep it off the event loop.
    return Response(await asyncio.to_thread(registry.render), media_type=registry.content_type)


videos_elsewhere_router = APIRouter(include_in_schema=False)
"""/v1/videos of a server whose engines run in other processes."""


@videos_elsewhere_router.api_route("/v1/videos", methods=["GET", "POST"])
@videos_elsewhere_router.api_route("/v1/videos/{path:path}", methods=["GET", "POST", "DELETE"])
async def videos_need_one_process() -> Response:
    raise OpenAIError(
        501,
        "video jobs are kept by a server in one process (teaserve serve without --ray), next to the engine that runs "
        "them; this server's engines run in other processes",
        code="not_implemented",
    )
