"""The FastAPI application in front of one AsyncEngine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from .. import __version__
from ..engine import AsyncEngine
from .errors import install_error_handlers
from .images.router import router as images_router
from .images.serving import ImageServing
from .lifecycle import DEFAULT_STALL_TIMEOUT, ServerLifecycle
from .metrics import RequestMetricsMiddleware, ServerMetrics
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from .routes import router as system_router
from .videos.router import router as videos_router
from .videos.serving import VideoServing

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 60.0


def build_app(
    engine: AsyncEngine,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    shutdown_engine: bool = True,
    data_dir: str | Path | None = None,
) -> FastAPI:
    """An OpenAI-compatible app serving `engine`'s model. The engine is shut down with the app by default.

    `body_timeout`: seconds a client has to send its whole request body (408 after).
    `stall_timeout`: seconds the running request may go without finishing a step before /ready fails.
    `data_dir`: where a video model keeps its jobs and their files (default: $TEASERVE_DATA_DIR, else the user's
    data folder); one server per folder. A model that makes images stores nothing.
    """
    lifecycle = ServerLifecycle(engine, stall_timeout=stall_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watchdog = asyncio.create_task(lifecycle.watch_progress())
        yield
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        if shutdown_engine:
            await lifecycle.close()
        await app.state.video_serving.close()

    app = FastAPI(title="teaserve", version=__version__, lifespan=lifespan)
    names = [served_model_name or engine.model.name]
    if engine.model.source not in names:
        names.append(engine.model.source)
    if engine.model.name not in names:
        names.append(engine.model.name)
    app.state.engine = engine
    app.state.lifecycle = lifecycle
    app.state.metrics = ServerMetrics(engine)
    app.state.image_serving = ImageServing(engine, names, app.state.metrics, lifecycle)
    app.state.video_serving = VideoServing(engine, names, app.state.metrics, data_dir)
    app.include_router(images_router)
    app.include_router(videos_router)
    app.include_router(system_router)
    install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, read_timeout=body_timeout)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer carries X-Request-Id
    return app
