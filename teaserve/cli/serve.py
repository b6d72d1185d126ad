"""`teaserve serve`: load the model, then open the port."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from ..engine import AsyncEngine, EngineArgs
from ..server import build_app

logger = logging.getLogger("teaserve.serve")

API_KEY_ENV = "TEASERVE_API_KEY"


def run(args: argparse.Namespace) -> int:
    if args.max_body_mb <= 0:
        raise ValueError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    # The model loads before the port opens: a client never meets a half-started server.
    engine = AsyncEngine(EngineArgs.from_cli_args(args))
    app = build_app(
        engine,
        served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV),
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
    )
    logger.info(
        "serving %s (%s) with cache backend %s on http://%s:%d",
        app.state.image_serving.served_model_name,
        engine.model.architecture,
        engine.cache_backend_name,
        args.host,
        args.port,
    )
    # uvicorn turns Ctrl-C / SIGTERM into a graceful shutdown; the app's lifespan then stops the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10)
    return 0
