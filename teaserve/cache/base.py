"""The cache-backend contract, quality targets, and strict parsing of cache settings."""

from __future__ import annotations

import dataclasses
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

REQUEST_PARAM = "cache_config"
"""The wire name of per-request cache settings."""

QUALITY_TARGET = "quality_target"
QUALITY_TABLE = "quality_table"
MAX_QUALITY_DB = 100.0
MAX_TABLE_STEP_COUNTS = 32
MAX_TABLE_ROWS = 64


class CacheSettingsError(ValueError):
    """Invalid cache settings. `param` names the request parameter they came in (for HTTP errors)."""

    param = REQUEST_PARAM


def short_repr(value: Any, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters: error messages never echo long untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_quality_target(value: Any) -> float:
    # Comparisons, not float(): 10**400 and NaN are refused instead of overflowing or slipping through.
    if not is_number(value) or not 0 < value <= MAX_QUALITY_DB:
        raise ValueError(
            f"{QUALITY_TARGET} must be a mean PSNR in dB against uncached, in (0, {MAX_QUALITY_DB:g}], "
            f"got {short_repr(value)}"
        )
    return float(value)


@dataclass(frozen=True)
class QualityTable:
    """A backend's calibrated quality: for each calibrated step count, (tuning value, mean PSNR in dB against
    uncached on the calibration prompts) pairs, written by `teaserve calibrate` into a model's profile."""

    rows: dict[int, tuple[tuple[float, float], ...]] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: Any) -> QualityTable:
        """From its JSON form `{"30": [[value, psnr_db], ...], ...}`; anything else raises a ValueError."""
        shape = f'{QUALITY_TABLE} must look like {{"30": [[value, psnr_db], ...]}} (written by teaserve calibrate)'
        if not isinstance(value, dict) or not 0 < len(value) <= MAX_TABLE_STEP_COUNTS:
            raise ValueError(f"{shape}, with 1 to {MAX_TABLE_STEP_COUNTS} step counts")
        rows: dict[int, tuple[tuple[float, float], ...]] = {}
        for steps, pairs in value.items():
            if not (isinstance(steps, str | int) and str(steps).isdecimal() and 0 < int(steps) <= 10_000):
                raise ValueError(f"{shape}; {short_repr(steps)} is not a step count")
            if not isinstance(pairs, list | tuple) or not 0 < len(pairs) <= MAX_TABLE_ROWS:
                raise ValueError(f"{shape}, with 1 to {MAX_TABLE_ROWS} rows per step count")
            for pair in pairs:
                if not (
                    isinstance(pair, list | tuple)
                    and len(pair) == 2
                    and all(is_number(item) and math.isfinite(item) for item in pair)
                ):
                    raise ValueError(f"{shape}; {short_repr(pair)} is not a [value, psnr_db] pair")
            rows[int(steps)] = tuple((float(a), float(b)) for a, b in pairs)
        return cls(rows)

    def as_json(self) -> dict[str, list[list[float]]]:
        return {str(steps): [list(pair) for pair in pairs] for steps, pairs in sorted(self.rows.items())}

    def calibrated_steps(self, num_steps: int) -> int:
        """The calibrated step count nearest to `num_steps` (by ratio)."""
        return min(self.rows, key=lambda steps: (abs(math.log(steps / num_steps)), steps))

    def choose(self, num_steps: int, target: float) -> tuple[int, float | None, float | None]:
        """(calibrated step count used, the fastest tuning value that meets `target` and whose slower values all
        meet it too, its PSNR); the value is None when the slowest misses it (larger tuning values are faster).

        Requiring the slower values too keeps a noisy table (few calibration prompts) from choosing a fast value
        that happened to score well past a slower one that did not."""
        steps = self.calibrated_steps(num_steps)
        chosen: tuple[float | None, float | None] = (None, None)
        for value, psnr in sorted(self.rows[steps]):
            if psnr < target:
                break
            chosen = (value, psnr)
        return steps, *chosen


@dataclass(frozen=True)
class QualitySettings:
    """The server settings every backend shares: a default `quality_target` and the `quality_table`."""

    target: float | None = None
    table: QualityTable | None = None

    @classmethod
    def split(cls, settings: dict[str, Any], backend: str) -> tuple[QualitySettings, dict[str, Any]]:
        """(the shared settings, the method's own) of server settings."""
        own = {key: value for key, value in settings.items() if key not in (QUALITY_TARGET, QUALITY_TABLE)}
        table = None if settings.get(QUALITY_TABLE) is None else QualityTable.parse(settings[QUALITY_TABLE])
        target = None if settings.get(QUALITY_TARGET) is None else check_quality_target(settings[QUALITY_TARGET])
        if target is not None and table is None:
            raise ValueError(no_table_message(backend))
        return cls(target, table), own


def no_table_message(backend: str) -> str:
    return (
        f"{QUALITY_TARGET} needs a {QUALITY_TABLE} for {backend} on this model: run `teaserve calibrate "
        f"--backend {backend}` and start the server with its profile"
    )


class Calibrator(ABC):
    """What a method learns about a model from uncached runs, e.g. MagCache's magnitude ratios.

    `teaserve calibrate` attaches it to the pipeline's transformer (`attach`), runs the calibration prompts
    uncached at each step count, calls `end_request(num_steps)` after each request, then `detach`es it and writes
    `fit()` (JSON-able server settings of the method) into the model's profile."""

    @abstractmethod
    def attach(self, transformer) -> None: ...

    @abstractmethod
    def detach(self) -> None: ...

    @abstractmethod
    def end_request(self, num_steps: int) -> None:
        """The request just run had `num_steps` steps: file what was recorded during it."""

    @abstractmethod
    def fit(self) -> dict[str, Any]:
        """The method's server settings fitted on everything recorded."""

    def candidates(self) -> dict[str, dict[str, Any]]:
        """Alternative fits, by label, that calibration compares by the PSNR they keep over the tuning grid on
        validation prompts before writing the best; by default only `fit()`."""
        return {"fit": self.fit()}


class CacheBackend(ABC):
    """A step-caching method. One instance serves one pipeline, one request at a time.

    Settings come in two kinds. Server settings (`from_config`, `configure`) are trusted: they may name files and
    choose per-model data such as coefficients. Request overrides (`check_overrides`, `begin_request`) are not:
    only `enabled`, `quality_target` and the method's `request_keys` are accepted, checked without any I/O.

    Every method has one `tuning_key`, the setting that trades speed for quality (larger is faster): `teaserve
    bench` sweeps it, and `quality_target` (a mean PSNR in dB against uncached) chooses it from the backend's
    calibrated `quality_table`; both may be server settings (`quality_target` then is the default of requests).

    The engine calls `apply(pipeline)` once; then, per request, `begin_request` before the pipeline call,
    `set_step` as the denoising loop advances, and `stats` after it. A method finds what it needs to know about
    the pipeline's transformer through its registered `CacheTarget` (`cache_target_for`), so it works on every
    model whose family declares one. A subclass implements `configure_method`, `start_request` and
    `request_stats`, and declares `request_checks`; this class handles what all methods share.
    """

    name: ClassVar[str]
    request_keys: ClassVar[tuple[str, ...]] = ("enabled",)
    """What a request may put in its cache settings besides `quality_target`."""
    request_checks: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}
    """The check of each request key's value besides `enabled` (it raises a ValueError naming the bounds)."""
    tuning_key: ClassVar[str | None] = None
    """The setting that trades speed for quality, larger = faster; None for a method without one."""
    tuning_values: ClassVar[tuple[float, ...]] = ()
    """The values of `tuning_key` that `teaserve bench` and `teaserve calibrate` sweep, slowest first."""
    supports_row_groups: ClassVar[bool] = False
    """Whether the method keeps a separate state for each group of rows of one batched transformer call
    (`set_row_groups`), so that requests and CFG branches batched together get exactly what each gets alone."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        """The server settings in force."""
        self.quality = QualitySettings()
        self.quality_used: dict[str, Any] | None = None
        """How the last request's quality target was met (reported in its stats)."""

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> Self:
        """Build from server settings; unknown keys and bad values raise a ValueError naming the valid keys."""
        backend = cls()
        backend.configure(config)
        return backend

    @classmethod
    def merge_settings(cls, model_settings: dict[str, Any] | None, user_settings: dict[str, Any] | None):
        """A model's recommended settings (its profile) with the user's on top."""
        return {**(model_settings or {}), **(user_settings or {})}

    def configure(self, settings: dict[str, Any] | None) -> None:
        """Replace the server settings (between requests); bad settings raise and change nothing."""
        settings = {} if settings is None else settings
        if not isinstance(settings, dict):
            raise ValueError(f"{self.name} settings must be a JSON object, got {type(settings).__name__}")
        quality, own = QualitySettings.split(settings, self.name)
        if quality.table is not None and self.tuning_key is None:
            raise ValueError(f"the {self.name!r} cache backend has no setting that a {QUALITY_TABLE} could choose")
        self.configure_method(own)
        self.quality, self.settings = quality, dict(settings)

    @classmethod
    def calibrator(cls) -> Calibrator | None:
        """What `teaserve calibrate` fits for this method before measuring its quality table (None: nothing)."""
        return None

    @abstractmethod
    def configure_method(self, settings: dict[str, Any]) -> None:
        """Take the method's own server settings; bad settings raise and change nothing."""

    @abstractmethod
    def apply(self, pipeline) -> None: ...

    @abstractmethod
    def remove(self, pipeline) -> None: ...

    def check_overrides(self, overrides: dict[str, Any] | None) -> dict[str, Any]:
        """`overrides` as valid per-request settings, else a CacheSettingsError naming the valid keys.

        Never reads files or does other I/O: it runs on the server's event loop."""
        valid = self.request_keys if self.tuning_key is None else (*self.request_keys, QUALITY_TARGET)
        overrides = check_request_keys(overrides, valid, self.name)
        own = {key: value for key, value in overrides.items() if key != QUALITY_TARGET}
        if QUALITY_TARGET in overrides:
            try:
                check_quality_target(overrides[QUALITY_TARGET])
            except ValueError as error:
                raise CacheSettingsError(f"{REQUEST_PARAM}: {error}") from None
            if self.tuning_key in overrides:
                raise CacheSettingsError(f"{REQUEST_PARAM}: give {QUALITY_TARGET} or {self.tuning_key}, not both")
            if self.quality.table is None:
                raise CacheSettingsError(f"{REQUEST_PARAM}: {no_table_message(self.name)}")
        self.check_method_overrides(own)
        return overrides

    def request_defaults(self) -> dict[str, Any]:
        """What each of the method's request keys other than `enabled` is for a request that leaves it out: the server
        settings in force, as the method parsed them into its `config`."""
        config = getattr(self, "config", None)
        return {key: getattr(config, key) for key in self.request_keys if key != "enabled" and hasattr(config, key)}

    def check_method_overrides(self, overrides: dict[str, Any]) -> None:
        """Raise a CacheSettingsError if the method's own request keys carry bad values (no I/O): by default each
        value present goes through its `request_checks` entry."""
        for key, check in self.request_checks.items():
            if key in overrides:
                try:
                    check(overrides[key])
                except ValueError as error:
                    raise CacheSettingsError(f"{REQUEST_PARAM}: {error}") from None

    def begin_request(self, num_steps: int, overrides: dict[str, Any] | None = None) -> None:
        """Reset all state for a new request of `num_steps` steps with optional per-request overrides."""
        overrides = self.check_overrides(overrides)
        target = overrides.pop(QUALITY_TARGET, None)
        if target is None and self.tuning_key not in overrides:
            target = self.quality.target
        self.quality_used = None
        if target is not None and overrides.get("enabled", True):
            assert self.quality.table is not None and self.tuning_key is not None  # checked with the settings
            steps, value, psnr = self.quality.table.choose(num_steps, target)
            self.quality_used = {
                "target_db": target,
                "calibrated_steps": steps,
                self.tuning_key: value,
                "calibrated_psnr_db": psnr,
            }
            # No calibrated setting reaches the target: compute every step (exactly the uncached image).
            overrides = {**overrides, self.tuning_key: value} if value is not None else {**overrides, "enabled": False}
        self.start_request(num_steps, overrides)

    @abstractmethod
    def start_request(self, num_steps: int, overrides: dict[str, Any]) -> None:
        """Reset the method's state for a new request; `overrides` are checked and hold no quality target."""

    def set_step(self, step_index: int) -> None:  # noqa: B027  (optional: only step-aware methods need it)
        """The denoising loop is now at `step_index` (0-based)."""

    def set_row_groups(self, labels: Sequence[str]) -> None:
        """For the request that `begin_request` began: its transformer calls are batched, made under
        `ROWS_CONTEXT`, with one label per row (`row_group_label`). Rows with equal labels (one request's outputs in
        one CFG branch, contiguous) share one state and one decision, as one branch of a request alone does; the
        stats report each label as a branch (`stats_of_request` splits them). Only where `supports_row_groups`."""
        raise NotImplementedError(f"the {self.name!r} cache backend cannot keep per-row state in a batched call")

    def stats(self) -> dict[str, Any] | None:
        """Statistics of the last request (finite numbers only), or None when the backend has nothing to report.

        The shape every method reports: backend, enabled, num_steps, computed_steps and skipped_steps (summed over
        CFG branches), its tuning value, and `branches` {name: {computed_steps, skipped_steps, schedule, ...}},
        plus `quality` when a quality target chose the setting."""
        stats = self.request_stats()
        if stats is not None and self.quality_used is not None:
            stats["quality"] = self.quality_used
        return stats

    def request_stats(self) -> dict[str, Any] | None:
        return None


ROWS_CONTEXT = "rows"
"""The `cache_context` of batched transformer calls whose rows the backend was told by `set_row_groups`."""
_REQUEST_SEPARATOR = "/"


def row_group_label(request_index: int, branch: str) -> str:
    """The label of the rows of request `request_index` (in its batch) in CFG branch `branch`."""
    return f"{request_index}{_REQUEST_SEPARATOR}{branch}"


def contiguous_groups(labels: Sequence[str]) -> list[tuple[str, slice]]:
    """(label, rows) of each group of equal labels, which must be contiguous."""
    groups: list[tuple[str, slice]] = []
    start = 0
    for index in range(1, len(labels) + 1):
        if index == len(labels) or labels[index] != labels[start]:
            groups.append((labels[start], slice(start, index)))
            start = index
    if len({label for label, _ in groups}) != len(groups):
        raise ValueError(f"the rows of each group must be contiguous, got {list(labels)}")
    return groups


def stats_of_request(stats: dict[str, Any] | None, request_index: int) -> dict[str, Any] | None:
    """The statistics of a batch (`set_row_groups`) restricted to request `request_index`: its branches under their
    own names and the step counts summed over them."""
    if stats is None:
        return None
    prefix = f"{request_index}{_REQUEST_SEPARATOR}"
    branches = {
        name.removeprefix(prefix): branch
        for name, branch in (stats.get("branches") or {}).items()
        if name.startswith(prefix)
    }
    own = {**stats, "branches": branches}
    for key in ("computed_steps", "skipped_steps"):
        if key in stats:
            own[key] = sum(branch[key] for branch in branches.values())
    return own


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
    return dict(overrides)


class NoCache(CacheBackend):
    """Every step computed; takes no settings."""

    name = "none"
    supports_row_groups = True

    def set_row_groups(self, labels) -> None:
        pass

    def configure_method(self, settings) -> None:
        if settings:
            raise ValueError(f"the 'none' cache backend takes no settings, got {sorted(settings)}")

    def apply(self, pipeline) -> None:
        pass

    def remove(self, pipeline) -> None:
        pass

    def start_request(self, num_steps, overrides) -> None:
        pass

    def check_method_overrides(self, overrides) -> None:
        if overrides.get("enabled", False):
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


def read_json_file(path: str | Path, what: str, max_bytes: int) -> Any:
    """The JSON value of a small file written by `teaserve calibrate`; a ValueError naming `what` where it cannot be
    read, is larger than `max_bytes` or is not JSON."""
    path = Path(path)
    try:
        if not path.is_file():  # not a FIFO or a device that a read would hang on or never finish
            raise OSError("not a regular file")
        with path.open("rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as error:
        raise ValueError(f"cannot read {what}: {error.strerror or error}") from None
    if len(data) > max_bytes:
        raise ValueError(f"{what} is larger than {max_bytes} bytes")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{what} is not JSON (write it with teaserve calibrate)") from None


def parse_config_json(text: str) -> dict[str, Any]:
    """Parse a `--cache-config` JSON string strictly: it must be a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"cache config is not valid JSON ({error.msg} at position {error.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f'cache config must be a JSON object such as {{"rel_l1_thresh": 0.2}}, got {text!r}')
    return value
