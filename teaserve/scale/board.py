"""The ReplicaBoard: where every engine replica reports its state each second, and the ingress reads them.

Reports are plain dicts (`ReplicaReport` as a dict), so that the board's process imports neither torch nor any model
code: it holds only the latest report of each replica heard from lately.
"""

from __future__ import annotations

import time
from typing import Any

REPORT_INTERVAL = 1.0
"""Seconds between a replica's reports, and between the ingress's reads of the board."""
STALE_AFTER = 3 * REPORT_INTERVAL
"""A replica not heard from for this long is no longer counted live."""


class ReplicaBoard:
    def __init__(self) -> None:
        self._reports: dict[str, tuple[dict[str, Any], float]] = {}

    async def report(self, report: dict[str, Any]) -> None:
        self._reports[report["replica"]] = (report, time.monotonic())

    async def reports(self) -> dict[str, tuple[dict[str, Any], float]]:
        """Replica -> (its last report, that report's age in seconds); replicas silent for long are forgotten."""
        now = time.monotonic()
        self._reports = {replica: entry for replica, entry in self._reports.items() if now - entry[1] < STALE_AFTER}
        return {replica: (report, now - made) for replica, (report, made) in self._reports.items()}
