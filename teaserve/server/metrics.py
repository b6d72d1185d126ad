"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator.routing import get_route_name
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..cache import NoCache
from ..engine import EngineClient, RequestOutput

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_BRANCH_LABELS = 8
ALL_BRANCHES, OTHER_BRANCHES = "all", "other"


class PromptCacheCollector(Collector):
    """The prompt cache's hit and miss counts, read from the engine at each scrape."""

    def __init__(self, engine: EngineClient):
        self.engine = engine

    def collect(self) -> Iterator[CounterMetricFamily]:
        cache = self.engine.prompt_cache
        yield CounterMetricFamily(
            "teaserve_prompt_cache_hits",
            "Prompts and negative prompts whose encoding came from the prompt cache",
            value=cache.hits,
        )
        yield CounterMetricFamily(
            "teaserve_prompt_cache_misses",
            "Prompts and negative prompts the text encoder encoded",
            value=cache.misses,
        )


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: EngineClient):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "teaserve_requests",
            "Image requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "teaserve_request_latency_seconds",
            "End-to-end latency of image requests",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter("teaserve_images_generated", "Images returned", registry=self.registry)
        self.steps = Counter(
            "teaserve_denoising_steps",
            "Denoising steps by what the cache did, cache backend and CFG branch (branch 'all': not split by branch)",
            ["kind", "backend", "branch"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "teaserve_request_batch_size",
            "Requests in the batch each answered request ran in (1: alone)",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.video_jobs = Counter(
            "teaserve_video_jobs",
            "Video jobs by how they ended: completed, failed (a previous run's unfinished jobs at start included), "
            "cancelled (deleted before they ended)",
            ["status"],
            registry=self.registry,
        )
        self._branches: set[str] = set()
        queue_depth = Gauge("teaserve_queue_depth", "Requests waiting for a model worker", registry=self.registry)
        queue_depth.set_function(lambda: engine.queue_depth)
        running = Gauge("teaserve_requests_running", "Requests the model workers are running", registry=self.registry)
        running.set_function(lambda: engine.num_running)
        since_progress = Gauge(
            "teaserve_seconds_since_progress",
            "Seconds since the running request last finished a step (0 when idle); a large value is a stuck step",
            registry=self.registry,
        )
        since_progress.set_function(lambda: engine.seconds_since_progress or 0.0)
        self.registry.register(PromptCacheCollector(engine))

    def observe(self, endpoint: str, status: int | str, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def record_output(self, output: RequestOutput) -> None:
        self.images.inc(len(output.images))
        self.batch_size.observe(output.metrics.batch_size)
        cache = output.metrics.cache
        if not (cache and cache.get("enabled")):
            backend = cache["backend"] if cache else NoCache.name
            self.steps.labels("computed", backend, ALL_BRANCHES).inc(output.metrics.transformer_calls)
            return
        branches = cache.get("branches") or {}
        counted = [(self._branch_label(name), counts) for name, counts in branches.items()] or [(ALL_BRANCHES, cache)]
        for branch, counts in counted:
            for kind in ("computed", "skipped"):
                self.steps.labels(kind, cache["backend"], branch).inc(counts[f"{kind}_steps"])

    def _branch_label(self, name: str) -> str:
        """Branch names come from the cache backends (cond, uncond, ...); past MAX_BRANCH_LABELS distinct ones the
        rest count as "other", so that the number of series stays bounded."""
        if name in self._branches:
            return name
        if len(self._branches) < MAX_BRANCH_LABELS:
            self._branches.add(name)
            return name
        return OTHER_BRANCHES

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Count every request to the image endpoints by status (validation errors, 401s and 413s included).

    The endpoint label comes from the route the path matches, never from the path itself: requests to paths that
    match no route all count as "unmatched", so no client can make the metrics grow.
    """

    PREFIX = "/v1/images/"
    UNMATCHED = "unmatched"

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    def _endpoint(self, scope: Scope) -> str | None:
        """The label of an image route, UNMATCHED for a path that matches no route, None for the other routes."""
        template = get_route_name(HTTPConnection(scope), should_include_root_path=False)
        if template is None:
            return self.UNMATCHED
        return template[len(self.PREFIX) :].strip("/") if template.startswith(self.PREFIX) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._endpoint(scope) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        started, status, observed = time.perf_counter(), None, False

        def observe() -> None:
            nonlocal observed
            if not observed:
                observed = True
                label = "disconnected" if status in (None, 499) else status
                self.metrics.observe(endpoint, label, time.perf_counter() - started)

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                observe()  # before the last byte leaves: a client that has its answer sees it counted
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            observe()
