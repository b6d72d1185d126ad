"""TaylorSeer: diffusers' TaylorSeerCacheConfig on the block stack of the transformer's cache target.

TaylorSeer (arXiv 2503.06923) computes the stack on a fixed schedule and forecasts it in between: after its
first `disable_cache_before_step` steps, one step in every `cache_interval` is computed (from step
`disable_cache_before_step + 1` on; every step from `disable_cache_after_step`, if set), and each step in between
extrapolates the last block's outputs with a Taylor series of order `max_order`, built from finite differences of
the computed steps. The other blocks return placeholders on a forecast step, so none of the stack runs. Each CFG
branch counts its own steps and keeps its own series; both are reset for every request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

from .base import parse_config, short_repr
from .targets import DiffusersCacheBackend

NAME = "taylorseer"
MAX_CACHE_INTERVAL = 1000
MAX_STEP = 10_000
MAX_ORDER = 4


def check_integer(name: str, value: Any, low: int, high: int, meaning: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}]{meaning}, got {short_repr(value)}")
    return value


def check_cache_interval(value: Any) -> int:
    return check_integer("cache_interval", value, 1, MAX_CACHE_INTERVAL, " (1 computes every step)")


@dataclass(frozen=True)
class TaylorSeerSettings:
    """cache_interval: one step in this many is computed once the first steps are (larger = faster); 3 by default,
        not diffusers' 5: a series forecasting four steps in a row drifts visibly at common step counts.
    disable_cache_before_step: the steps computed first, at least 1 (a forecast needs a computed step).
    disable_cache_after_step: every step from this one on is computed; None = none.
    max_order: order of the Taylor series (0 repeats the last computed outputs)."""

    cache_interval: int = 3
    disable_cache_before_step: int = TaylorSeerCacheConfig.disable_cache_before_step
    disable_cache_after_step: int | None = None
    max_order: int = TaylorSeerCacheConfig.max_order

    def __post_init__(self) -> None:
        check_cache_interval(self.cache_interval)
        check_integer("disable_cache_before_step", self.disable_cache_before_step, 1, MAX_STEP)
        if self.disable_cache_after_step is not None:
            check_integer("disable_cache_after_step", self.disable_cache_after_step, 0, MAX_STEP, " or null")
        check_integer("max_order", self.max_order, 0, MAX_ORDER)


class TaylorSeerBackend(DiffusersCacheBackend):
    """`taylorseer`: server settings are TaylorSeerSettings' fields; a request may set `enabled` and
    `cache_interval`."""

    name = NAME
    request_keys = ("enabled", "cache_interval")
    request_checks = {"cache_interval": check_cache_interval}
    tuning_key = "cache_interval"
    tuning_values = (2, 3, 4, 6, 15)

    def __init__(self) -> None:
        super().__init__()
        self.config = TaylorSeerSettings()

    def configure_method(self, settings) -> None:
        self.config = parse_config(TaylorSeerSettings, settings, what=NAME)

    def request_settings(self, num_steps, overrides) -> dict[str, Any]:
        config = self.config
        return {
            # A quality table holds tuning values as floats.
            "cache_interval": round(overrides.get("cache_interval", config.cache_interval)),
            "disable_cache_before_step": config.disable_cache_before_step,
            "disable_cache_after_step": config.disable_cache_after_step,
            "max_order": config.max_order,
        }

    def diffusers_cache(self, settings):
        *others, last = (re.escape(name) for name in self.block_names)
        return apply_taylorseer_cache, TaylorSeerCacheConfig(
            **settings,
            taylor_factors_dtype=None,  # the series in the model's own dtype
            # Only the last block's outputs are forecast; the blocks before it return placeholders meanwhile.
            cache_identifiers=[last],
            skip_predict_identifiers=[f"(?:{'|'.join(others)})"] if others else [],
        )
