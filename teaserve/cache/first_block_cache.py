"""First Block Cache: diffusers' FirstBlockCacheConfig on the block stack of the transformer's cache target.

Every step computes the first block; when its residual (output minus input) changed by at most `threshold`
(mean absolute difference over mean absolute value) since the last step that computed the whole stack, the other
blocks are skipped and the residual they added then is added again. Each CFG branch keeps its own state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

from .base import is_number, parse_config, short_repr
from .targets import DiffusersCacheBackend

NAME = "first_block_cache"
MAX_THRESHOLD = 1e9
"""A threshold this high computes only the first step of each branch in full."""


def check_threshold(value: Any) -> float:
    # Comparisons (not float()) so that 10**400 and NaN are refused instead of overflowing or slipping through.
    if not is_number(value) or not 0 <= value <= MAX_THRESHOLD:
        raise ValueError(f"threshold must be a number in [0, {MAX_THRESHOLD:g}], got {short_repr(value)}")
    return float(value)


@dataclass(frozen=True)
class FirstBlockCacheSettings:
    """threshold: largest relative change of the first block's residual at which the other blocks are skipped
    (larger = faster); 0 computes every step whose first block changed at all."""

    threshold: float = FirstBlockCacheConfig.threshold

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_threshold(self.threshold))


class FirstBlockCacheBackend(DiffusersCacheBackend):
    """`first_block_cache`: server setting `threshold`; a request may set `enabled` and `threshold`."""

    name = NAME
    request_keys = ("enabled", "threshold")
    request_checks = {"threshold": check_threshold}
    tuning_key = "threshold"
    tuning_values = (0.1, 0.2, 0.3, 0.5, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.config = FirstBlockCacheSettings()

    def configure_method(self, settings) -> None:
        self.config = parse_config(FirstBlockCacheSettings, settings, what=NAME)

    def check_transformer(self, transformer, target) -> None:
        if len(target.block_stack(transformer)) < 2:
            raise ValueError(
                f"{NAME} needs at least two blocks (it always computes the first), but the cache target of "
                f"{type(transformer).__name__} has one"
            )

    def request_settings(self, num_steps, overrides) -> dict[str, Any]:
        return {"threshold": float(overrides.get("threshold", self.config.threshold))}

    def diffusers_cache(self, settings):
        return apply_first_block_cache, FirstBlockCacheConfig(threshold=settings["threshold"])
