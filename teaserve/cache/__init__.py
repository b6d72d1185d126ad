"""Step-caching backends, selected by name: "none", "tea_cache"."""

from __future__ import annotations

import os
from typing import Any

from .base import CacheBackend, NoCache, parse_config, parse_config_json
from .teacache import TeaCacheBackend, TeaCacheConfig

CACHE_BACKEND_ENV = "DIFFUSION_CACHE_BACKEND"

CACHE_BACKENDS: dict[str, type[CacheBackend]] = {NoCache.name: NoCache, TeaCacheBackend.name: TeaCacheBackend}


def cache_backend_names() -> list[str]:
    return sorted(CACHE_BACKENDS)


def resolve_backend_name(name: str | None) -> str:
    """The backend to use: `name`, else $DIFFUSION_CACHE_BACKEND, else "none"; unknown names raise."""
    if name is None:
        name = os.environ.get(CACHE_BACKEND_ENV) or NoCache.name
    name = name.strip().lower()
    if name not in CACHE_BACKENDS:
        raise ValueError(f"unknown cache backend {name!r}; valid choices: {', '.join(cache_backend_names())}")
    return name


def create_cache_backend(name: str | None, config: dict[str, Any] | None = None) -> CacheBackend:
    return CACHE_BACKENDS[resolve_backend_name(name)].from_config(config)


__all__ = [
    "CACHE_BACKENDS",
    "CACHE_BACKEND_ENV",
    "CacheBackend",
    "NoCache",
    "TeaCacheBackend",
    "TeaCacheConfig",
    "cache_backend_names",
    "create_cache_backend",
    "parse_config",
    "parse_config_json",
    "resolve_backend_name",
]
