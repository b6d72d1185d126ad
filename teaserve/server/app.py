"""The FastAPI application in front of one AsyncEngine."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from ..engine import AsyncEngine
from .errors import install_error_handlers
from .images.router import router as images_router
from .images.serving import ImageServing
from .metrics import RequestMetricsMiddleware, ServerMetrics
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from .routes import router as system_router

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


def build_app(
    engine: AsyncEngine,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    shutdown_engine: bool = True,
) -> FastAPI:
    """An OpenAI-compatible app serving `engine`'s model. The engine is shut down with the app by default."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine:
            engine.shutdown()

    app = FastAPI(title="teaserve", version=__version__, lifespan=lifespan)
    names = [served_model_name or engine.model.name]
    if engine.model.source not in names:
        names.append(engine.model.source)
    if engine.model.name not in names:
        names.append(engine.model.name)
    app.state.engine = engine
    app.state.metrics = ServerMetrics(engine)
    app.state.image_serving = ImageServing(engine, names, app.state.metrics)
    app.include_router(images_router)
    app.include_router(system_router)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries X-Request-Id
    return app
