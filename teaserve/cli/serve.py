"""`teaserve serve`: load the model, then open the port."""

from __future__ import annotations

import argparse
import logging
import os

from ..engine import AsyncEngine, EngineArgs
from ..server import build_app
from ..server.runner import build_server

logger = logging.getLogger("teaserve.serve")

API_KEY_ENV = "TEASERVE_API_KEY"


def run(args: argparse.Namespace) -> int:
    for flag in ("max_body_mb", "body_timeout", "stall_timeout"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if not args.shutdown_grace >= 0:
        raise ValueError(f"--shutdown-grace must be 0 or more seconds, got {args.shutdown_grace}")
    # The model loads before the port opens: a client never meets a half-started server.
    engine = AsyncEngine(EngineArgs.from_cli_args(args))
    app = build_app(
        engine,
        served_model_name=args.served_model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV),
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        body_timeout=args.body_timeout,
        stall_timeout=args.stall_timeout,
        data_dir=args.data_dir,
    )
    logger.info(
        "serving %s (%s) with cache backend %s on http://%s:%d",
        app.state.image_serving.served_model_name,
        engine.model.architecture,
        engine.cache_backend_name,
        args.host,
        args.port,
    )
    store = app.state.video_serving.store
    if store is not None:
        logger.info("video jobs and their files are kept in %s", store.data_dir)
    # SIGTERM / Ctrl-C drain the server (see GracefulServer); the app's lifespan then stops the engine.
    build_server(
        app, host=args.host, port=args.port, log_level=args.log_level, shutdown_grace=args.shutdown_grace
    ).run()
    return 0
