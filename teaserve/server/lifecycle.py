"""The server's health and its way down: readiness, the progress watchdog, draining and abandoning requests."""

from __future__ import annotations

import asyncio
import logging

from ..engine import EngineClient

logger = logging.getLogger(__name__)

DEFAULT_STALL_TIMEOUT = 120.0
"""Seconds the running request may go without finishing a step before /ready fails and a warning is logged."""
WORKER_STOP_TIMEOUT = 2.0
"""Seconds the server waits for an idle worker thread to end when it closes."""


class ServerLifecycle:
    """Shared by what drives the server down (the runner, on signals) and the handlers that answer meanwhile.

    Draining: the engine takes no new request and fails the waiting ones (503 shutting_down); the running one
    goes on. Abandoning, when the grace period is over: handlers still waiting for the engine answer 503 at once
    and the running request is cancelled at its next step.
    """

    def __init__(self, engine: EngineClient, *, stall_timeout: float = DEFAULT_STALL_TIMEOUT):
        if not stall_timeout > 0:
            raise ValueError(f"the stall timeout must be a positive number of seconds, got {stall_timeout!r}")
        self.engine = engine
        self.stall_timeout = stall_timeout
        self.abandoned = asyncio.Event()

    def begin_drain(self) -> None:
        self.engine.begin_shutdown()

    def abandon(self) -> None:
        """Stop waiting for the engine: the waiting handlers answer 503 now (call on the event loop)."""
        self.engine.shutdown(wait=False)
        self.abandoned.set()

    async def close(self) -> None:
        """Stop the engine and give its worker a moment to end, without blocking the event loop."""
        self.engine.shutdown(wait=False)
        if not await self.engine.wait_stopped(WORKER_STOP_TIMEOUT):
            logger.warning("the model worker is still inside a step of request %s", self.engine.running_request_id)

    def seconds_stalled(self) -> float | None:
        """Seconds since the running request last advanced, when that is over the stall timeout; else None."""
        seconds = self.engine.seconds_since_progress
        return seconds if seconds is not None and seconds > self.stall_timeout else None

    def unready_reason(self) -> str | None:
        """Why the server should get no traffic now (a short code), or None when it is ready."""
        if not self.engine.is_alive:
            return "worker_stopped"
        if not self.engine.accepting:
            return "shutting_down"
        if self.seconds_stalled() is not None:
            return "stalled"
        return None

    async def watch_progress(self) -> None:
        """Log a warning, once per stall, when the running request stops advancing; log when it moves again."""
        warned_about: str | None = None
        while True:
            await asyncio.sleep(min(1.0, self.stall_timeout / 4))
            seconds = self.seconds_stalled()
            if seconds is not None and warned_about is None:
                warned_about = self.engine.running_request_id or "-"
                logger.warning(
                    "request %s has not finished a step for %.1f s (stall timeout %g s); /ready answers 503 "
                    "until it moves",
                    warned_about,
                    seconds,
                    self.stall_timeout,
                )
            elif seconds is None and warned_about is not None:
                logger.info("request %s is no longer stalled", warned_about)
                warned_about = None
