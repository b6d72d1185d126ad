"""Which cache backends a sweep runs: those named, or every registered one with a tuning key that works here."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..cache import CACHE_BACKENDS, CacheBackend, resolve_backend_name
from ..engine import AsyncEngine


def tunable_backends() -> list[str]:
    """Every registered backend with a setting that trades speed for quality, in registry order."""
    return [name for name, backend in CACHE_BACKENDS.items() if backend.tuning_key is not None]


def sweep_backends(
    engine: AsyncEngine,
    names: Sequence[str] | None,
    *,
    apply: bool,
    log: Callable[[str], None] = lambda message: None,
) -> list[str]:
    """`names` checked (unknown names and backends without a tuning key raise a ValueError), or, when None, every
    backend with a tuning key that can be built on this engine's model with its settings (and, with `apply`,
    applied to its pipeline); the others are skipped with a note through `log`, e.g. a method whose package is
    not installed or that does not support this transformer."""
    if names is not None:
        resolved = [resolve_backend_name(name) for name in names]
        for name in resolved:
            if CACHE_BACKENDS[name].tuning_key is None:
                raise ValueError(
                    f"the {name!r} cache backend has no tuning key to sweep; backends with one: "
                    f"{', '.join(tunable_backends())}"
                )
        return list(dict.fromkeys(resolved))
    usable = []
    for name in tunable_backends():
        try:
            backend = engine.create_cache_backend(name)
            if apply:
                try_applying(engine, backend)
        except Exception as error:  # any failure to build or apply one method only drops that method
            log(f"skipping {name}: {type(error).__name__}: {error}")
            continue
        usable.append(name)
    return usable


def try_applying(engine: AsyncEngine, backend: CacheBackend) -> None:
    """Apply `backend` to the engine's pipeline and take it off again; raises where it does not apply."""
    previous = engine.use_cache_backend(backend)
    engine.use_cache_backend(previous)
