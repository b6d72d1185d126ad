"""`teaserve serve`: load the model, then open the port."""

from __future__ import annotations

import argparse
import logging
import os

from ..engine import AsyncEngine, EngineArgs
from ..server import build_app
from ..server.app import check_server_settings
from ..server.middleware import API_KEY_ENV
from ..server.runner import build_server
from .args import SCALE_FLAGS

logger = logging.getLogger("teaserve.serve")


def run(args: argparse.Namespace) -> int:
    check_server_settings(
        max_body_mb=args.max_body_mb,
        body_timeout=args.body_timeout,
        stall_timeout=args.stall_timeout,
        shutdown_grace=args.shutdown_grace,
    )
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    if args.ray:
        if args.data_dir is not None:
            raise ValueError("--data-dir: video jobs need a server in one process (teaserve serve without --ray)")
        return serve_on_ray(args, api_key)
    given = [name for name in SCALE_FLAGS if getattr(args, name) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} needs --ray")
    # The model loads before the port opens: a client never meets a half-started server.
    engine = AsyncEngine(EngineArgs.from_cli_args(args))
    app = build_app(
        engine,
        served_model_name=args.served_model_name,
        api_key=api_key,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        body_timeout=args.body_timeout,
        stall_timeout=args.stall_timeout,
        data_dir=args.data_dir,
        playground=args.playground,
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


def serve_on_ray(args: argparse.Namespace, api_key: str | None) -> int:
    """The same server on Ray Serve: this process deploys it and waits; the replicas load the model."""
    from ..scale.launch import serve_on_ray as serve
    from ..scale.settings import ScaleSettings

    settings = ScaleSettings.from_cli_args(args, api_key=api_key)
    return serve(settings, host=args.host, port=args.port, address=args.ray_address)
