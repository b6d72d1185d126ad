"""The cache-backend contract and strict parsing of cache settings."""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

REQUEST_PARAM = "cache_config"
"""The wire name of per-request cache settings."""


class CacheSettingsError(ValueError):
    """Invalid cache settings. `param` names the request parameter they came in (for HTTP errors)."""

    param = REQUEST_PARAM


def short_repr(value: Any, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters: error messages never echo long untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CacheBackend(ABC):
    """A step-caching method. One instance serves one pipeline, one request at a time.

    Settings come in two kinds. Server settings (`from_config`, `configure`) are trusted: they may name files and
    choose per-model data such as coefficients. Request overrides (`check_overrides`, `begin_request`) are not:
    only the keys in `request_keys` are accepted, checked without any I/O.

    The engine calls `apply(pipeline)` once; then, per request, `begin_request` before the pipeline call,
    `set_step` as the denoising loop advances, and `stats` after it. A method finds what it needs to know about
    the pipeline's transformer through its registered `CacheTarget` (`cache_target_for`), so it works on every
    model whose family declares one.
    """

    name: ClassVar[str]
    request_keys: ClassVar[tuple[str, ...]] = ("enabled",)
    """What a request may put in its cache settings."""

    settings: dict[str, Any]
    """The server settings in force."""

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any] | None) -> Self:
        """Build from server settings; unknown keys and bad values raise a ValueError naming the valid keys."""

    @classmethod
    def merge_settings(cls, model_settings: dict[str, Any] | None, user_settings: dict[str, Any] | None):
        """A model's recommended settings (its profile) with the user's on top."""
        return {**(model_settings or {}), **(user_settings or {})}

    @abstractmethod
    def configure(self, settings: dict[str, Any] | None) -> None:
        """Replace the server settings (between requests); bad settings raise and change nothing."""

    @abstractmethod
    def apply(self, pipeline) -> None: ...

    @abstractmethod
    def remove(self, pipeline) -> None: ...

    @abstractmethod
    def check_overrides(self, overrides: dict[str, Any] | None) -> None:
        """Raise a CacheSettingsError naming the valid keys if `overrides` are not valid per-request settings.

        Never reads files or does other I/O: it runs on the server's event loop."""

    @abstractmethod
    def begin_request(self, num_steps: int, overrides: dict[str, Any] | None = None) -> None:
        """Reset all state for a new request of `num_steps` steps with optional per-request overrides."""

    def set_step(self, step_index: int) -> None:  # noqa: B027  (optional: only step-aware methods need it)
        """The denoising loop is now at `step_index` (0-based)."""

    def stats(self) -> dict[str, Any] | None:
        """Statistics of the last request (finite numbers only), or None when the backend has nothing to report."""
        return None


def check_request_keys(overrides: dict[str, Any] | None, valid: tuple[str, ...], what: str) -> dict[str, Any]:
    """`overrides` as a dict, refusing keys a request may not set with a message that lists the ones it may."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise CacheSettingsError(f"{REQUEST_PARAM} must be a JSON object, got {type(overrides).__name__}")
    unknown = sorted(str(key)[:40] for key in set(overrides) - set(valid))
    if unknown:
        raise CacheSettingsError(
            f"{REQUEST_PARAM} key(s) {unknown} cannot be set per request with {what}; valid keys for a request: "
            f"{', '.join(valid)} (other settings belong to the server: --cache-config or the model folder)"
        )
    enabled = overrides.get("enabled", True)
    if not isinstance(enabled, bool):
        raise CacheSettingsError(f"{REQUEST_PARAM} 'enabled' must be true or false, got {short_repr(enabled)}")
    return overrides


class NoCache(CacheBackend):
    """Every step computed; takes no settings."""

    name = "none"

    def __init__(self) -> None:
        self.settings = {}

    @classmethod
    def from_config(cls, config):
        backend = cls()
        backend.configure(config)
        return backend

    def configure(self, settings) -> None:
        if settings:
            raise ValueError(f"the 'none' cache backend takes no settings, got {sorted(settings)}")

    def apply(self, pipeline) -> None:
        pass

    def remove(self, pipeline) -> None:
        pass

    def begin_request(self, num_steps, overrides=None) -> None:
        self.check_overrides(overrides)

    def check_overrides(self, overrides) -> None:
        if check_request_keys(overrides, self.request_keys, "no cache backend").get("enabled", False):
            raise CacheSettingsError(
                f'this model runs without a cache backend, so a request can only pass {{"enabled": false}} as '
                f"{REQUEST_PARAM}; start the server with --cache-backend tea_cache to tune caching"
            )


def parse_config(config_cls: type, config: dict[str, Any] | None, *, what: str, extra_keys: tuple[str, ...] = ()):
    """Build the dataclass `config_cls` from a dict, refusing unknown keys with a message that lists the valid ones.

    `extra_keys` are valid keys the caller has already consumed (they are listed, not passed on)."""
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise ValueError(f"{what} settings must be a JSON object, got {type(config).__name__}")
    fields = [field.name for field in dataclasses.fields(config_cls) if field.init]
    valid = [*fields, *extra_keys]
    unknown = sorted(str(key)[:40] for key in set(config) - set(valid))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; valid keys: {', '.join(valid)}")
    try:
        return config_cls(**{key: value for key, value in config.items() if key in fields})
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
