"""The cache-backend contract and strict parsing of cache settings."""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self


class CacheBackend(ABC):
    """A step-caching method. One instance serves one pipeline, one request at a time.

    The engine calls `begin_request` before a pipeline call, `set_step` as the denoising loop advances, and
    `stats` after it; `apply`/`remove` attach and detach the method.
    """

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any] | None) -> Self:
        """Build from user settings; unknown keys and bad values raise a ValueError naming the valid keys."""

    @classmethod
    def merge_settings(cls, model_settings: dict[str, Any] | None, user_settings: dict[str, Any] | None):
        """A model's recommended settings (its profile) with the user's on top."""
        return {**(model_settings or {}), **(user_settings or {})}

    @abstractmethod
    def apply(self, pipeline) -> None: ...

    @abstractmethod
    def remove(self, pipeline) -> None: ...

    @abstractmethod
    def check_overrides(self, overrides: dict[str, Any] | None) -> None:
        """Raise a ValueError naming the valid keys if `overrides` are not valid per-request settings."""

    @abstractmethod
    def begin_request(self, num_steps: int, overrides: dict[str, Any] | None = None) -> None:
        """Reset all state for a new request of `num_steps` steps with optional per-request overrides."""

    def set_step(self, step_index: int) -> None:  # noqa: B027  (optional: only step-aware methods need it)
        """The denoising loop is now at `step_index` (0-based)."""

    def stats(self) -> dict[str, Any] | None:
        """Statistics of the last request, or None when the backend has nothing to report."""
        return None


class NoCache(CacheBackend):
    """Every step computed; takes no settings."""

    name = "none"

    @classmethod
    def from_config(cls, config):
        if config:
            raise ValueError(f"the 'none' cache backend takes no settings, got {sorted(config)}")
        return cls()

    def apply(self, pipeline) -> None:
        pass

    def remove(self, pipeline) -> None:
        pass

    def begin_request(self, num_steps, overrides=None) -> None:
        self.check_overrides(overrides)

    def check_overrides(self, overrides) -> None:
        if overrides and overrides != {"enabled": False}:
            raise ValueError(
                "this model runs without a cache backend, so a request can only pass "
                '{"enabled": false} as cache_config; start the server with --cache-backend tea_cache to tune caching'
            )


def parse_config(config_cls: type, config: dict[str, Any] | None, *, what: str):
    """Build the dataclass `config_cls` from a dict, refusing unknown keys with a message that lists the valid ones."""
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"{what} settings must be a JSON object, got {type(config).__name__}")
    valid = [field.name for field in dataclasses.fields(config_cls) if field.init]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; valid keys: {', '.join(valid)}")
    try:
        return config_cls(**config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"invalid {what} settings: {error} (valid keys: {', '.join(valid)})") from None


def parse_config_json(text: str) -> dict[str, Any]:
    """Parse a `--cache-config` JSON string strictly: it must be a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"cache config is not valid JSON ({error.msg} at position {error.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f'cache config must be a JSON object such as {{"rel_l1_thresh": 0.2}}, got {text!r}')
    return value
