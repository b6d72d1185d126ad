"""teaserve as a Ray Serve application: the Ingress (the same FastAPI app as `teaserve serve`), the Engine replicas
(one AsyncEngine each, on its own device) and the ReplicaBoard (where the replicas report their state).

    serve run teaserve.scale.app:application model=Qwen/Qwen-Image max_replicas=4
    serve deploy teaserve.yaml        # import_path: teaserve.scale.app:application, args: teaserve's settings

Capacity: a replica takes up to max_batch_size requests at once (Serve's max_ongoing_requests); the ingress lets
up to max_queue_size more wait for a replica (per ingress replica; one by default) and answers 429 beyond.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
import torch
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from ..engine import (
    AsyncEngine,
    EngineArgs,
    EngineStoppedError,
    GenerationError,
    InvalidParameterError,
    OmniDiffusionSamplingParams,
    ProgressEvent,
    PromptInput,
    QueueFullError,
    RequestCancelledError,
    RequestOutput,
)
from ..server import build_app
from ..server.middleware import API_KEY_ENV
from .board import REPORT_INTERVAL, ReplicaBoard
from .client import Admitted, RayEngineClient, ReplicaCollector, ReplicaReport
from .settings import ScaleSettings

logger = logging.getLogger(__name__)

INGRESS_MAX_ONGOING_REQUESTS = 10_000
"""HTTP requests one ingress replica handles at once: far above what the engines take, so that Serve's proxy
never queues or refuses in front of teaserve's own admission (429s and their Retry-After come from the ingress)."""
BOARD_MAX_ONGOING_REQUESTS = 1_000

REFUSALS = (InvalidParameterError, QueueFullError, EngineStoppedError)
FAILURES = (GenerationError, RequestCancelledError, EngineStoppedError)


class Engine:
    """One model on one device: an AsyncEngine that runs the requests the ingress sends (see `run`)."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor; the reports need its loop
        self, engine_args: EngineArgs, board: DeploymentHandle, torch_threads: int
    ):
        torch.set_num_threads(torch_threads)
        self.engine = AsyncEngine(engine_args)
        self.replica = serve.get_replica_context().replica_tag
        self.node = ray.util.get_node_ip_address()
        self.completed = 0
        self.board = board
        self.reporter = asyncio.create_task(self._report_forever())

    async def run(
        self,
        prompt: PromptInput,
        params: OmniDiffusionSamplingParams,
        *,
        num_previews: int,
        request_id: str,
        progress: bool,
    ) -> AsyncIterator[Admitted | ProgressEvent | RequestOutput | Exception]:
        """Prepare and run one request: first `Admitted` (or the refusal), then the progress events when asked
        for, then the output (or the failure). Errors are passed as values: they are the engine's own, for the
        ingress to answer as a server in one process would. Cancelling the call cancels the generation."""
        try:
            generation = await self.engine.start(
                prompt, params, num_previews=num_previews, request_id=request_id, progress=progress
            )
        except REFUSALS as refusal:
            yield refusal
            return
        yield Admitted(generation.request_id, generation.width, generation.height, self.replica)
        try:
            async with contextlib.aclosing(generation.events()) as events:
                async for item in events:
                    if isinstance(item, RequestOutput):
                        self.completed += 1
                    yield item
        except FAILURES as failure:
            yield failure

    def check_health(self) -> None:
        """Serve replaces a replica whose model worker has stopped."""
        if not self.engine.is_alive:
            raise RuntimeError(f"the model worker of replica {self.replica} has stopped")

    def report(self) -> ReplicaReport:
        engine = self.engine
        return ReplicaReport(
            replica=self.replica,
            pid=os.getpid(),
            node=self.node,
            served_model=engine.served_model,
            alive=engine.is_alive,
            accepting=engine.accepting,
            queue_depth=engine.queue_depth,
            num_running=engine.num_running,
            seconds_since_progress=engine.seconds_since_progress,
            running_request_id=engine.running_request_id,
            completed=self.completed,
            prompt_cache_hits=engine.prompt_cache.hits,
            prompt_cache_misses=engine.prompt_cache.misses,
        )

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.board.report.remote(dataclasses.asdict(self.report()))
            except Exception as error:  # the board restarts with Serve; the next report goes through
                logger.warning("replica %s could not report to the board: %s", self.replica, error)
            await asyncio.sleep(REPORT_INTERVAL)

    def __del__(self) -> None:
        self.reporter.cancel()
        self.engine.shutdown(wait=False)


class Ingress:
    """The HTTP API: teaserve's FastAPI app in front of a RayEngineClient (built once the client has connected)."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, engine: DeploymentHandle, board: DeploymentHandle, settings: ScaleSettings
    ):
        self.settings = settings
        self.client = RayEngineClient(
            engine,
            board,
            replica_capacity=settings.engine.max_batch_size,
            max_queue_size=settings.engine.max_queue_size,
        )
        await self.client.connect()

    def __serve_build_asgi_app__(self) -> FastAPI:
        settings = self.settings
        app = build_app(
            self.client,
            served_model_name=settings.served_model_name,
            api_key=settings.api_key or os.environ.get(API_KEY_ENV),
            max_body_bytes=int(settings.max_body_mb * 1024 * 1024),
            body_timeout=settings.body_timeout,
            stall_timeout=settings.stall_timeout,
            request_id_header=False,  # Serve's proxy sets X-Request-Id on requests and answers
            playground=settings.playground,
        )
        app.state.metrics.registry.register(ReplicaCollector(self.client))
        return app


ENGINE = serve.deployment(Engine, name="Engine")
BOARD = serve.deployment(
    ReplicaBoard,
    name="ReplicaBoard",
    num_replicas=1,
    max_ongoing_requests=BOARD_MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 0},
)
INGRESS = serve.deployment(
    serve.ingress()(Ingress),  # the app comes from __serve_build_asgi_app__, once the replica is constructed
    name="Ingress",
    max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS,
    ray_actor_options={"num_cpus": 0},
)


def build(settings: ScaleSettings) -> Application:
    """The application for `settings` (Ray must be initialised when the replicas' GPUs are left to the cluster)."""
    board = BOARD.bind()
    engine = ENGINE.options(**engine_options(settings)).bind(settings.engine, board, settings.torch_threads)
    return INGRESS.options(graceful_shutdown_timeout_s=settings.shutdown_grace).bind(engine, board, settings)


def application(args: dict[str, Any]) -> Application:
    """The application builder of `serve run` and Serve config files: `args` are teaserve's settings (see
    `ScaleSettings.from_options`)."""
    return build(ScaleSettings.from_options(args))


def engine_options(settings: ScaleSettings) -> dict[str, Any]:
    """Serve's options of the Engine deployment."""
    engine = settings.engine
    gpus = settings.replica_gpus
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    options: dict[str, Any] = {
        "max_ongoing_requests": engine.max_batch_size,
        "ray_actor_options": {"num_cpus": settings.replica_cpus, "num_gpus": gpus},
        "graceful_shutdown_timeout_s": settings.shutdown_grace,
    }
    if settings.autoscaling:
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {
            "min_replicas": settings.min_replicas or 1,
            "initial_replicas": settings.replicas,
            "max_replicas": settings.max_replicas,
            # a replica counts as full with a whole batch running
            "target_ongoing_requests": engine.max_batch_size,
        }
    else:
        options["num_replicas"] = settings.replicas or 1
    return options
