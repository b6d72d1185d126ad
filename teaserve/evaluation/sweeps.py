"""What bench and calibration sweeps run unless told otherwise (no heavy imports: the CLI parser reads these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_THRESHOLDS = (0.1, 0.2, 0.4, 0.6, 0.8)
"""Thresholds `teaserve bench` sweeps."""
CALIBRATION_STEPS = (10, 20, 30, 50)
"""Step counts `teaserve calibrate` records: the fit must hold wherever requests go."""
CALIBRATION_PROMPTS = 16
SHRINKAGES = (1.0, 0.75, 0.5, 0.25, 0.1)
"""Polynomials between the fit (1) and the mean output change (0) that validation compares."""
VALIDATION_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.6, 0.8)
VALIDATION_SPEEDUPS = (2.0, 3.0, 4.0, 5.0)
"""Block-stack-evaluation speedups at which validation compares PSNR (those every variant reaches)."""


@dataclass
class Variant:
    """A named set of server-side cache settings (e.g. other coefficients) the thresholds are swept on.

    They layer over the engine's own settings the way `--cache-config` layers over a model's."""

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
