"""The app under uvicorn: HTTP limits and timeouts, and a graceful shutdown on SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from .lifecycle import ServerLifecycle

logger = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_GRACE = 30.0
"""Seconds the running request may take to finish after SIGTERM before it is answered 503 and the server exits."""
KEEP_ALIVE_TIMEOUT = 5
"""Seconds an idle keep-alive connection stays open between requests."""
HEAD_TIMEOUT = 10.0
"""Seconds a connection has to send the request line and headers of its next request."""
MAX_HEAD_BYTES = 16 * 1024
"""Most bytes of a request head h11 buffers while waiting for its end (400 above)."""
FLUSH_TIMEOUT = 5
"""Seconds uvicorn gives answers still being sent once the server closes."""


class ServerConfig(uvicorn.Config):
    """uvicorn's settings plus the seconds a connection has to send a complete request head."""

    def __init__(self, app: FastAPI, *, head_timeout: float = HEAD_TIMEOUT, **kwargs: Any):
        super().__init__(app, **kwargs)
        self.head_timeout = head_timeout


class TimedH11Protocol(H11Protocol):
    """h11 that closes connections which do not send a complete request head in time (ServerConfig.head_timeout).

    uvicorn's keep-alive timer only runs between requests, not before the first one, and any byte stops it:
    without this, an idle or half-sent connection stays open for good.
    """

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request head has arrived
            self._stop_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._stop_head_timer()
        timeout = getattr(self.config, "head_timeout", HEAD_TIMEOUT)
        self._head_timer = self.loop.call_later(timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class GracefulServer(uvicorn.Server):
    """uvicorn with teaserve's way down.

    The first SIGTERM or Ctrl-C drains: the port stays open but the engine takes no new request (503
    shutting_down with Retry-After), the waiting requests get the same answer at once, and the running one has
    `grace` seconds to finish; then the server closes. When the grace period is over, the requests still waiting
    for the engine are answered 503 and the server closes anyway. A second signal exits at once. The event loop
    never waits on the worker: the drain is checked on uvicorn's 0.1 s tick.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: ServerLifecycle, grace: float):
        if not grace >= 0:
            raise ValueError(f"the shutdown grace period must be a number of seconds >= 0, got {grace!r}")
        super().__init__(config)
        self.lifecycle, self.grace = lifecycle, grace
        self._drain_requested = False
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only set flags here; on_tick acts on them from the event loop.
        if self._drain_requested:
            self.force_exit = True
            super().handle_exit(sig, frame)  # uvicorn closes without waiting, then re-raises the signal
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        return self._drain_requested and self._drained()

    def _drained(self) -> bool:
        """One step of the drain; True once the server may close."""
        now = time.monotonic()
        engine = self.lifecycle.engine
        if self._drain_deadline is None:
            self._drain_deadline = now + self.grace
            logger.info(
                "shutting down: new and waiting requests are refused, the running one has %g s to finish", self.grace
            )
            self.lifecycle.begin_drain()
        if self.lifecycle.abandoned.is_set():  # the 503 answers are on their way: close once they have left
            return not self.server_state.tasks or now >= self._drain_deadline + FLUSH_TIMEOUT
        if not self.server_state.tasks and not engine.num_running:
            return True
        if now >= self._drain_deadline:
            logger.warning(
                "the shutdown grace period of %g s is over: request %s is answered 503 and cancelled",
                self.grace,
                engine.running_request_id,
            )
            self.lifecycle.abandon()
        return False


def build_server(
    app: FastAPI,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    head_timeout: float = HEAD_TIMEOUT,
) -> GracefulServer:
    """A server for an app made by `build_app`, with teaserve's connection limits and shutdown."""
    config = ServerConfig(
        app,
        head_timeout=head_timeout,
        host=host,
        port=port,
        log_level=log_level,
        http=TimedH11Protocol,
        ws="none",
        lifespan="on",
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=FLUSH_TIMEOUT,
    )
    return GracefulServer(config, app.state.lifecycle, shutdown_grace)
