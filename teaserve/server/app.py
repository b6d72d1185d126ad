"""The FastAPI application in front of an engine: an AsyncEngine, or a client of engines in other processes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI

from .. import __version__
from ..engine import AsyncEngine, EngineClient
from .errors import install_error_handlers
from .images.router import router as images_router
from .images.serving import ImageServing
from .lifecycle import DEFAULT_STALL_TIMEOUT, ServerLifecycle
from .metrics import RequestMetricsMiddleware, ServerMetrics
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, RequestIdMiddleware
from .playground.router import playground_router
from .routes import router as system_router
from .routes import videos_elsewhere_router
from .videos.router import router as videos_router
from .videos.serving import VideoServing

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 60.0


def check_server_settings(
    *, max_body_mb: float, body_timeout: float, stall_timeout: float, shutdown_grace: float
) -> None:
    """Refuse `teaserve serve`'s HTTP settings out of range, naming the flag (before any model loads)."""
    for name, value in (("max_body_mb", max_body_mb), ("body_timeout", body_timeout), ("stall_timeout", stall_timeout)):
        if not value > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be 0 or more seconds, got {shutdown_grace}")


def build_app(
    engine: EngineClient,
    *,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
    shutdown_engine: bool = True,
    data_dir: str | Path | None = None,
    request_id_header: bool = True,
    playground: bool = True,
) -> FastAPI:
    """An OpenAI-compatible app serving `engine`'s model. The engine is shut down with the app by default.

    `body_timeout`: seconds a client has to send its whole request body (408 after).
    `stall_timeout`: seconds the running request may go without finishing a step before /ready fails.
    `data_dir`: where a video model keeps its jobs and their files (default: $TEASERVE_DATA_DIR, else the user's
    data folder); one server per folder. A model that makes images stores nothing.
    `request_id_header`: answer with X-Request-Id; False behind a proxy that sets it on requests and answers.
    `playground`: serve the playground page at / (public; the API calls it makes carry the key typed into it).
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
        if app.state.video_serving is not None:
            await app.state.video_serving.close()

    app = FastAPI(title="teaserve", version=__version__, lifespan=lifespan)
    model = engine.served_model
    names = [served_model_name or model.name]
    if model.source not in names:
        names.append(model.source)
    if model.name not in names:
        names.append(model.name)
    app.state.engine = engine
    app.state.lifecycle = lifecycle
    app.state.metrics = ServerMetrics(engine)
    app.state.image_serving = ImageServing(engine, names, app.state.metrics, lifecycle)
    app.include_router(images_router)
    if isinstance(engine, AsyncEngine):
        app.state.video_serving = VideoServing(engine, names, app.state.metrics, data_dir)
        app.include_router(videos_router)
    else:  # video jobs live in one process's store, next to the engine that runs them
        app.state.video_serving = None
        app.include_router(videos_elsewhere_router)
    app.include_router(system_router)
    if playground:
        app.include_router(playground_router())
    install_error_handlers(app)
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, read_timeout=body_timeout)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware, answer_header=request_id_header)  # outermost: every answer has the id
    return app
