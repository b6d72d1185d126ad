"""The ingress's engine: an EngineClient whose requests run on the replicas of the Engine deployment.

Each request is one streaming call through a DeploymentHandle. The replica prepares the request against its model
and queues it on its AsyncEngine, then answers `Admitted` (or the refusal: the engine's InvalidParameterError,
QueueFullError or EngineStoppedError, passed as a value), then the progress events when asked for, then the output
(or the failure). A replica that dies fails its own requests with WorkerLostError. Cancelling the call cancels the
generation on the replica.

Admission is the client's: it holds at most `replica_capacity` requests per live replica plus `max_queue_size`
waiting, and refuses more with QueueFullError (429). Serve's own per-handle queue limit counts every request as
queued until a replica is chosen, so that a burst onto idle replicas would be refused too; its BackPressureError,
should a deployment set `max_queued_requests`, is a QueueFullError as well.

Every replica reports its state to the ReplicaBoard each second; the client reads the board each second, which
gives /ready its live replicas and /metrics the per-replica series.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from ..engine import (
    EngineStoppedError,
    GenerationError,
    ImageSource,
    OmniDiffusionSamplingParams,
    ProgressEvent,
    PromptInput,
    QueueFullError,
    RequestOutput,
    ServedCache,
    ServedModel,
    WorkerLostError,
)
from ..engine.request import new_request_id
from .board import REPORT_INTERVAL, STALE_AFTER

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 600.0
"""Seconds the ingress waits at start for a first replica to report (its model may be downloading)."""


@dataclass(frozen=True)
class Admitted:
    """A replica's first answer to a request it took: the request as its model resolved it."""

    request_id: str
    width: int
    height: int
    replica: str


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica tells the board each second."""

    replica: str
    pid: int
    node: str
    served_model: ServedModel
    alive: bool
    accepting: bool
    queue_depth: int
    num_running: int
    seconds_since_progress: float | None
    running_request_id: str | None
    completed: int
    """Requests the replica has answered with an output."""
    prompt_cache_hits: int
    prompt_cache_misses: int

    @classmethod
    def from_dict(cls, report: dict[str, Any]) -> ReplicaReport:
        """The report as `dataclasses.asdict` gave it to the board."""
        model = report["served_model"]
        cache = ServedCache(**{**model["cache"], "request_keys": tuple(model["cache"]["request_keys"])})
        served = ServedModel(**{**model, "default_size": tuple(model["default_size"]), "cache": cache})
        return cls(**{**report, "served_model": served})


@dataclass(frozen=True)
class CacheTotals:
    hits: int
    misses: int


class RayEngineClient:
    """The EngineClient of an ingress: the Engine deployment's replicas run the requests.

    `queue_depth` counts the requests sent and not yet taken by a replica (waiting in the handle's queue), and
    `num_running` those a replica has taken and not answered; per-replica figures come from the board.
    """

    def __init__(
        self, engine: DeploymentHandle, board: DeploymentHandle, *, replica_capacity: int, max_queue_size: int
    ):
        self._engine = engine.options(stream=True)
        self._board = board
        self.replica_capacity, self.max_queue_size = replica_capacity, max_queue_size
        self._reports: dict[str, tuple[ReplicaReport, float]] = {}
        """Replica -> (its last report, when it was made on this process's monotonic clock)."""
        self._served_model: ServedModel | None = None
        self._accepting = True
        self._stopped = False
        self._waiting = 0
        self._running: weakref.WeakValueDictionary[str, RayGeneration] = weakref.WeakValueDictionary()
        """The generations replicas have taken and not ended; one dropped unread ends when it is collected."""
        self._seconds_per_request = 1.0
        self._follower: asyncio.Task[None] | None = None

    async def connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Wait for a first replica report (which says what model is served), then follow the board."""
        deadline = time.monotonic() + timeout
        while not self.live_replicas():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no engine replica reported within {timeout:g} s")
            await self.read_board()
            await asyncio.sleep(0.2)
        self._follower = asyncio.create_task(self._follow_board())

    async def read_board(self) -> None:
        try:
            reports: dict[str, tuple[dict[str, Any], float]] = await self._board.reports.remote()
        except Exception as error:  # the board restarts with Serve; the reports it had age meanwhile
            logger.warning("could not read the replica board: %s", error)
            return
        now = time.monotonic()
        self._reports = {
            replica: (ReplicaReport.from_dict(report), now - age) for replica, (report, age) in reports.items()
        }
        if self._served_model is None and self._reports:
            self._served_model = next(iter(self._reports.values()))[0].served_model

    async def _follow_board(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            await self.read_board()

    # -- state ---------------------------------------------------------------------------------------------------
    def live_replicas(self) -> dict[str, tuple[ReplicaReport, float]]:
        """Replica -> (its last report, its age in seconds), for replicas heard from lately whose worker lives."""
        now = time.monotonic()
        return {
            replica: (report, now - made)
            for replica, (report, made) in self._reports.items()
            if now - made < STALE_AFTER and report.alive
        }

    @property
    def served_model(self) -> ServedModel:
        if self._served_model is None:
            raise RuntimeError("not connected: no replica has reported yet")
        return self._served_model

    @property
    def is_alive(self) -> bool:
        return not self._stopped and bool(self.live_replicas())

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    def _busy_since(self) -> list[tuple[float, str | None]]:
        """(seconds since progress, request) of each live replica, or [] if one of them is idle."""
        busy = []
        for report, age in self.live_replicas().values():
            if report.seconds_since_progress is None:
                return []
            busy.append((report.seconds_since_progress + age, report.running_request_id))
        return busy

    @property
    def seconds_since_progress(self) -> float | None:
        """None while a live replica is idle; else the least time since a replica's request advanced (so that
        only replicas all stuck count as stalled)."""
        busy = self._busy_since()
        return min(seconds for seconds, _ in busy) if busy else None

    @property
    def running_request_id(self) -> str | None:
        busy = self._busy_since()
        return min(busy, key=lambda entry: entry[0])[1] if busy else None

    @property
    def prompt_cache(self) -> CacheTotals:
        reports = [report for report, _ in self.live_replicas().values()]
        return CacheTotals(
            hits=sum(report.prompt_cache_hits for report in reports),
            misses=sum(report.prompt_cache_misses for report in reports),
        )

    # -- requests ------------------------------------------------------------------------------------------------
    async def read_inputs(
        self, params: OmniDiffusionSamplingParams, images: list[BinaryIO], mask: BinaryIO | None
    ) -> tuple[list[ImageSource], ImageSource | None]:
        """The uploads' bytes: the replica that takes the request checks and decodes them when it prepares it."""

        def read() -> tuple[list[ImageSource], ImageSource | None]:
            return [image.read() for image in images], None if mask is None else mask.read()

        return await asyncio.to_thread(read)

    async def start(
        self,
        prompt: PromptInput,
        params: OmniDiffusionSamplingParams,
        *,
        num_previews: int = 0,
        request_id: str | None = None,
        progress: bool = False,
    ) -> RayGeneration:
        """Send the request to a replica and wait until it has taken it (or refused it)."""
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and takes no new requests")
        if (
            self._waiting + len(self._running)
            >= self.replica_capacity * len(self.live_replicas()) + self.max_queue_size
        ):
            raise self._busy()
        request_id = request_id or new_request_id()
        stream: DeploymentResponseGenerator = self._engine.run.remote(
            prompt, params, num_previews=num_previews, request_id=request_id, progress=progress
        )
        self._waiting += 1
        try:
            first = await anext(stream)
        except BackPressureError:
            raise self._busy() from None
        except RayActorError:
            raise WorkerLostError(f"the replica chosen for request {request_id} stopped before taking it") from None
        except BaseException:
            stream.cancel()
            raise
        finally:
            self._waiting -= 1
        if isinstance(first, Exception):  # refused: bad input, or the replica's own queue full or stopping
            raise first
        generation = RayGeneration(self, first, stream)
        self._running[request_id] = generation
        return generation

    def _busy(self) -> QueueFullError:
        replicas = max(1, len(self.live_replicas()))
        retry_after = max(1, math.ceil(self._seconds_per_request * (self._waiting + 1) / replicas))
        return QueueFullError(
            f"the server is busy: every replica is busy and {self.max_queue_size} requests are already waiting; "
            f"retry in {retry_after} s",
            retry_after=retry_after,
        )

    def record_end(self, generation: RayGeneration, seconds: float | None) -> None:
        """A generation has ended; `seconds`: how long it ran, when it gave its output."""
        self._running.pop(generation.request_id, None)
        if seconds is not None:
            self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * seconds

    # -- shutting down -------------------------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        self._accepting = False

    def shutdown(self, *, wait: bool = True) -> None:
        """Take no new request, cancel the running ones and stop reading the board (the replicas stay up: Serve
        owns them)."""
        self._accepting = False
        self._stopped = True
        for generation in list(self._running.values()):
            generation.cancel()
        if self._follower is not None:
            self._follower.cancel()

    async def wait_stopped(self, timeout: float | None = None) -> bool:
        return True


class RayGeneration:
    """A request a replica has taken (see `RayEngineClient.start`)."""

    def __init__(self, client: RayEngineClient, admitted: Admitted, stream: DeploymentResponseGenerator):
        self._client, self._admitted, self._stream = client, admitted, stream
        self._started = time.monotonic()
        self._unread = weakref.finalize(self, stream.cancel)  # dropped before it ended: free its replica

    @property
    def request_id(self) -> str:
        return self._admitted.request_id

    @property
    def width(self) -> int:
        return self._admitted.width

    @property
    def height(self) -> int:
        return self._admitted.height

    @property
    def replica(self) -> str:
        return self._admitted.replica

    async def events(self) -> AsyncGenerator[ProgressEvent | RequestOutput, None]:
        try:
            async for item in self._stream:
                if isinstance(item, Exception):  # the engine's failure, passed as a value
                    self._end(cancel=False)
                    raise item
                if isinstance(item, RequestOutput):
                    self._end(cancel=False, seconds=time.monotonic() - self._started)
                yield item
                if isinstance(item, RequestOutput):
                    return
            raise GenerationError(f"replica {self.replica} ended request {self.request_id} without an output")
        except RayActorError:
            raise WorkerLostError(f"replica {self.replica} stopped while running request {self.request_id}") from None
        finally:
            self._end(cancel=True)  # when the caller left early; nothing once the stream has ended

    async def output(self) -> RequestOutput:
        async with contextlib.aclosing(self.events()) as items:
            async for item in items:
                if isinstance(item, RequestOutput):
                    return item
        raise AssertionError("events() ends with the output or raises")

    def cancel(self) -> None:
        self._end(cancel=True)

    def _end(self, *, cancel: bool, seconds: float | None = None) -> None:
        if not self._unread.detach():  # ended already
            return
        if cancel:
            self._stream.cancel()
        self._client.record_end(self, seconds)


class ReplicaCollector(Collector):
    """Per-replica series on /metrics (label `replica`), from the board's latest reports of live replicas."""

    def __init__(self, client: RayEngineClient):
        self.client = client

    def collect(self) -> Iterator[Any]:
        live = self.client.live_replicas()
        yield GaugeMetricFamily("teaserve_replicas_live", "Engine replicas heard from lately", value=len(live))
        info = GaugeMetricFamily(
            "teaserve_replica_info", "Each live replica's process and node", labels=["replica", "pid", "node"]
        )
        gauges = {
            "queue_depth": GaugeMetricFamily(
                "teaserve_replica_queue_depth", "Requests waiting in a replica's engine", labels=["replica"]
            ),
            "num_running": GaugeMetricFamily(
                "teaserve_replica_requests_running", "Requests a replica's worker is running", labels=["replica"]
            ),
            "seconds_since_progress": GaugeMetricFamily(
                "teaserve_replica_seconds_since_progress",
                "Seconds since a replica's running request last finished a step (0 when idle)",
                labels=["replica"],
            ),
            "report_age": GaugeMetricFamily(
                "teaserve_replica_report_age_seconds", "Age of a replica's last report", labels=["replica"]
            ),
        }
        counters = {
            "completed": CounterMetricFamily(
                "teaserve_replica_requests_completed", "Requests a replica answered with an output", labels=["replica"]
            ),
            "prompt_cache_hits": CounterMetricFamily(
                "teaserve_replica_prompt_cache_hits", "A replica's prompt cache hits", labels=["replica"]
            ),
            "prompt_cache_misses": CounterMetricFamily(
                "teaserve_replica_prompt_cache_misses", "A replica's prompt cache misses", labels=["replica"]
            ),
        }
        for replica, (report, age) in sorted(live.items()):
            info.add_metric([replica, str(report.pid), report.node], 1)
            values = {
                "queue_depth": report.queue_depth,
                "num_running": report.num_running,
                "seconds_since_progress": report.seconds_since_progress or 0.0,
                "report_age": age,
                "completed": report.completed,
                "prompt_cache_hits": report.prompt_cache_hits,
                "prompt_cache_misses": report.prompt_cache_misses,
            }
            for name, gauge in gauges.items():
                gauge.add_metric([replica], values[name])
            for name, counter in counters.items():
                counter.add_metric([replica], values[name])
        yield info
        yield from gauges.values()
        yield from counters.values()
