"""What bench and calibration sweeps run unless told otherwise, and what they sweep (no heavy imports: the CLI
parser reads these)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

QUALITY_LEVELS_DB = (35.0, 40.0, 45.0)
"""Mean PSNR against uncached at which `teaserve bench` reports each variant's speedup, and the quality targets it
requests by default where a backend has a quality table."""
CALIBRATION_STEPS = (10, 20, 30, 50)
"""Step counts `teaserve calibrate` records: the fit must hold wherever requests go."""
CALIBRATION_PROMPTS = 16
SHRINKAGES = (1.0, 0.75, 0.5, 0.25, 0.1)
"""Polynomials between TeaCache's fit (1) and the mean output change (0) that validation compares."""
VALIDATION_SPEEDUPS = (2.0, 3.0, 4.0, 5.0)
"""Block-stack-evaluation speedups at which validation compares PSNR (those every candidate reaches)."""


@dataclass
class Variant:
    """A labelled set of server settings of one cache backend, layered over the model's own and the cache
    profile's the way --cache-config is; a sweep runs its backend's tuning values on it."""

    label: str
    backend: str
    settings: dict[str, Any] = field(default_factory=dict)


def tuning_grid(values: Sequence[float]) -> list[float]:
    """The tuning values a quality table is measured at: a backend's own `values` (slowest first), the midpoints
    between neighbours, and one value beyond each end: half the smallest (towards never skipping) and the largest
    plus the last gap (faster than any default). Integer values stay integers (midpoints rounded, duplicates
    dropped). Values a backend refuses are for the caller to drop (`teaserve calibrate` asks the backend)."""
    values = sorted(values)
    if not values:
        return []
    grid = [*values, *((low + high) / 2 for low, high in itertools.pairwise(values))]
    if values[0] > 0:
        grid.append(values[0] / 2)
    if len(values) > 1:
        grid.append(2 * values[-1] - values[-2])
    if all(float(value).is_integer() for value in values):
        return sorted({round(value) for value in grid})
    return sorted({float(f"{value:.12g}") for value in grid})  # 0.3, not 0.30000000000000004, in profiles
