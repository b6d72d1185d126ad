"""Step-caching backends, selected by name ("none", "tea_cache", "learned", ...), on the cache targets of models.

A backend is one file with its config, hooks and an `apply_*` function; it learns what it needs about a
transformer from the `CacheTarget` registered for the transformer's class, so it works on every declared model.
"""

from __future__ import annotations

import os
from typing import Any

from .base import (
    ROWS_CONTEXT,
    CacheBackend,
    CacheSettingsError,
    NoCache,
    parse_config,
    parse_config_json,
    row_group_label,
    stats_of_request,
)
from .cache_dit import CacheDiTBackend
from .calibration import GateRecorder, record_gate_changes
from .first_block_cache import FirstBlockCacheBackend
from .learned import ForecastCalibrator, LearnedCacheBackend, LearnedCacheConfig
from .mag_cache import MagCacheBackend, MagRatioCalibrator
from .targets import (
    CacheTarget,
    StackShortcut,
    cache_target_for,
    denoising_transformers,
    register_cache_target,
    registered_transformers,
)
from .taylorseer import TaylorSeerBackend
from .teacache import (
    Rescaling,
    TeaCache,
    TeaCacheBackend,
    TeaCacheConfig,
    apply_teacache,
    plan_schedule,
    remove_teacache,
)

CACHE_BACKEND_ENV = "DIFFUSION_CACHE_BACKEND"

CACHE_BACKENDS: dict[str, type[CacheBackend]] = {
    NoCache.name: NoCache,
    TeaCacheBackend.name: TeaCacheBackend,
    LearnedCacheBackend.name: LearnedCacheBackend,
    CacheDiTBackend.name: CacheDiTBackend,
    FirstBlockCacheBackend.name: FirstBlockCacheBackend,
    MagCacheBackend.name: MagCacheBackend,
    TaylorSeerBackend.name: TaylorSeerBackend,
}


def cache_backend_names() -> list[str]:
    return sorted(CACHE_BACKENDS)


def resolve_backend_name(name: str | None, default: str | None = None) -> str:
    """The backend to use: `name`, else $DIFFUSION_CACHE_BACKEND, else `default` (a model's own choice), else
    "none"; unknown names raise."""
    name = name or os.environ.get(CACHE_BACKEND_ENV) or default or NoCache.name
    name = name.strip().lower()
    if name not in CACHE_BACKENDS:
        raise ValueError(f"unknown cache backend {name!r}; valid choices: {', '.join(cache_backend_names())}")
    return name


def create_cache_backend(name: str | None, config: dict[str, Any] | None = None) -> CacheBackend:
    return CACHE_BACKENDS[resolve_backend_name(name)].from_config(config)


__all__ = [
    "CACHE_BACKENDS",
    "CACHE_BACKEND_ENV",
    "ROWS_CONTEXT",
    "CacheBackend",
    "CacheSettingsError",
    "CacheTarget",
    "FirstBlockCacheBackend",
    "ForecastCalibrator",
    "GateRecorder",
    "LearnedCacheBackend",
    "LearnedCacheConfig",
    "MagCacheBackend",
    "MagRatioCalibrator",
    "NoCache",
    "Rescaling",
    "StackShortcut",
    "TaylorSeerBackend",
    "TeaCache",
    "TeaCacheBackend",
    "TeaCacheConfig",
    "apply_teacache",
    "cache_backend_names",
    "cache_target_for",
    "create_cache_backend",
    "denoising_transformers",
    "parse_config",
    "parse_config_json",
    "plan_schedule",
    "record_gate_changes",
    "register_cache_target",
    "registered_transformers",
    "remove_teacache",
    "resolve_backend_name",
    "row_group_label",
    "stats_of_request",
]
