"""Model list, health, readiness, version and metrics."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from .protocol import ModelCard, ModelList

router = APIRouter()
STARTED = int(time.time())


@router.get("/v1/models", response_model=ModelList, tags=["models"])
async def list_models(request: Request) -> ModelList:
    engine, serving = request.app.state.engine, request.app.state.image_serving
    model = engine.model
    width, height = model.default_size
    return ModelList(
        data=[
            ModelCard(
                id=serving.served_model_name,
                created=STARTED,
                architecture=model.architecture,
                can_edit=model.family.can_edit,
                max_input_images=model.family.max_input_images,
                default_size=f"{width}x{height}",
            )
        ]
    )


@router.get("/health", tags=["system"])
async def health(request: Request) -> Response:
    """200 while the model worker is alive."""
    alive = request.app.state.engine.is_alive
    return JSONResponse({"status": "ok" if alive else "dead"}, status_code=200 if alive else 503)


@router.get("/ready", tags=["system"])
async def ready(request: Request) -> Response:
    """200 once the model is loaded and the worker takes requests; 503 otherwise."""
    engine = request.app.state.engine
    body = {"ready": engine.is_alive, "model": request.app.state.image_serving.served_model_name}
    return JSONResponse(body, status_code=200 if engine.is_alive else 503)


@router.get("/version", tags=["system"])
async def version() -> dict:
    return {"version": __version__}


@router.get("/metrics", tags=["system"])
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics
    return Response(registry.render(), media_type=registry.content_type)
