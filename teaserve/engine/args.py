"""`EngineArgs`: every setting of an engine in one object, shared by Omni, AsyncEngine and the command line."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cache import CACHE_BACKEND_ENV, cache_backend_names, parse_config_json
from ..pipelines import DTYPE_CHOICES
from .params import MAX_OUTPUTS, MAX_STEPS

if TYPE_CHECKING:
    from ..pipelines import LoadedModel

DEFAULT_MAX_QUEUE_SIZE = 16
MAX_BATCH_SIZE = 64
MAX_BATCH_WAIT_MS = 10_000.0
MAX_PROMPT_CACHE_SIZE = 100_000


def json_object_arg(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object, parsed strictly (bad JSON or another JSON type is refused)."""
    try:
        return parse_config_json(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seconds_or_none(text: str) -> float | None:
    seconds = float(text)
    return None if seconds == 0 else seconds


def _flag(help: str, *, type: Callable[[str], Any] | None = None, **argparse_options: Any) -> dict[str, Any]:
    """Field metadata: the field is also a command-line flag (--field-name) with this help."""
    return {"help": help, "type": type, **argparse_options}


@dataclass(frozen=True)
class EngineArgs:
    """How to load a model and what the engine accepts. `EngineArgs.add_cli_args` makes each field a flag.

    The limits bound the work one request may ask for; a request over a limit is refused with a ValueError
    (HTTP 400) that names the limit and the flag that raises it, before it is queued.
    """

    model: str | Path | LoadedModel | None = None
    """A diffusers folder, a Hugging Face Hub id, a loaded model, or None for the embedded default model."""
    cache_backend: str | None = field(
        default=None,
        metadata=_flag(
            f"step-caching method (default: ${CACHE_BACKEND_ENV}, else the model's own choice, else none)",
            choices=cache_backend_names(),
        ),
    )
    cache_config: dict[str, Any] | None = field(
        default=None,
        metadata=_flag(
            "cache settings as a JSON object, e.g. '{\"rel_l1_thresh\": 0.2}'", type=json_object_arg, metavar="JSON"
        ),
    )
    cache_profile: str | Path | None = field(
        default=None,
        metadata=_flag(
            "a cache profile written by `teaserve calibrate` (JSON): its settings per backend layer between the "
            "model folder's and --cache-config",
            metavar="FILE",
        ),
    )
    device: str | None = field(default=None, metadata=_flag("auto (default), cpu, cuda, cuda:N"))
    dtype: str | None = field(
        default=None, metadata=_flag("auto: bfloat16 on GPU, float32 on CPU", choices=DTYPE_CHOICES)
    )
    max_queue_size: int = field(
        default=DEFAULT_MAX_QUEUE_SIZE, metadata=_flag("requests that may wait (429 beyond)", type=int)
    )
    request_timeout: float | None = field(
        default=300.0,
        metadata=_flag(
            "seconds a request may run before it fails and the worker moves on (0: no limit)",
            type=_seconds_or_none,
            metavar="SECONDS",
        ),
    )
    max_steps: int = field(
        default=200, metadata=_flag(f"most denoising steps per request (up to {MAX_STEPS})", type=int)
    )
    max_outputs: int = field(default=4, metadata=_flag(f"most images per request, n (up to {MAX_OUTPUTS})", type=int))
    max_image_pixels: int = field(
        default=2**21, metadata=_flag("most pixels (width x height) per output image", type=int)
    )
    max_request_pixels: int = field(
        default=2**24, metadata=_flag("most output pixels per request (n x images per output x pixels)", type=int)
    )
    max_aspect_ratio: float = field(
        default=4.0, metadata=_flag("largest ratio of an output's long side to its short side", type=float)
    )
    max_input_image_pixels: int = field(
        default=2**24, metadata=_flag("most pixels per input image or mask (read from its header)", type=int)
    )
    max_input_pixels: int = field(
        default=3 * 2**24, metadata=_flag("most pixels of all input images and the mask of a request", type=int)
    )
    max_batch_size: int = field(
        default=8,
        metadata=_flag(
            "most requests run together in one pipeline call (compatible ones only: same size, steps, guidance and "
            "cache settings; 1: no batching)",
            type=int,
        ),
    )
    batch_wait_ms: float = field(
        default=20.0,
        metadata=_flag(
            "milliseconds a request may wait for compatible partners before its batch starts, under load only: "
            "for as many as the previous batch had (0: take only those already queued)",
            type=float,
            metavar="MS",
        ),
    )
    prompt_cache_size: int = field(
        default=256,
        metadata=_flag("encoded prompts kept for reuse, least recently used dropped first (0: no cache)", type=int),
    )
    batched_runs: bool = True
    """Run text-to-image requests through the model family's batched loop where it has one (both CFG branches, and
    compatible queued requests, in one transformer call); False: always the diffusers pipeline, one call per CFG
    branch (what calibration records, as its recorders observe each branch's calls)."""
    profile: bool = False
    """Also time the transformer, synchronising the device around each call (for benchmarks)."""

    def __post_init__(self) -> None:
        _check_int(self, "max_queue_size", 1)
        _check_int(self, "max_steps", 1, MAX_STEPS)
        _check_int(self, "max_outputs", 1, MAX_OUTPUTS)
        for name in ("max_image_pixels", "max_request_pixels", "max_input_image_pixels", "max_input_pixels"):
            _check_int(self, name, 1)
        _check_number(self, "max_aspect_ratio", 1.0)
        _check_int(self, "max_batch_size", 1, MAX_BATCH_SIZE)
        _check_number(self, "batch_wait_ms", 0.0)
        if self.batch_wait_ms > MAX_BATCH_WAIT_MS:
            raise ValueError(
                f"{setting_name('batch_wait_ms')} must be at most {MAX_BATCH_WAIT_MS:g}, got {self.batch_wait_ms!r}"
            )
        _check_int(self, "prompt_cache_size", 0, MAX_PROMPT_CACHE_SIZE)
        if self.request_timeout is not None:
            _check_number(self, "request_timeout", 0.0, inclusive=False)

    # -- command line ------------------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(
        cls, parser: argparse.ArgumentParser, *, only: Collection[str] | None = None
    ) -> argparse.ArgumentParser:
        """Add a --flag for every setting with a help text (all but `model` and `profile`), or for those `only`."""
        group = parser.add_argument_group("engine")
        for spec in dataclasses.fields(cls):
            if "help" not in spec.metadata or (only is not None and spec.name not in only):
                continue
            options = {key: value for key, value in spec.metadata.items() if value is not None}
            default = spec.default
            options["help"] = f"{options['help']} (default: {default})" if default is not None else options["help"]
            group.add_argument(flag_of(spec.name), dest=spec.name, default=default, **options)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """The settings parsed by a parser that `add_cli_args` filled; absent flags keep their defaults."""
        return cls(
            **{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls) if hasattr(args, spec.name)}
        )

    @classmethod
    def of(cls, model: str | Path | LoadedModel | EngineArgs | None, settings: dict[str, Any]) -> EngineArgs:
        """`model` with `settings` (EngineArgs fields) on top; `model` may itself be an EngineArgs."""
        if isinstance(model, EngineArgs):
            return dataclasses.replace(model, **settings)
        return cls(model=model, **settings)


def flag_of(name: str) -> str:
    """The command-line flag of an EngineArgs field."""
    return "--" + name.replace("_", "-")


def setting_name(name: str) -> str:
    """How an error names a setting: the field and its flag."""
    return f"{name} ({flag_of(name)})"


def _check_int(args: EngineArgs, name: str, low: int, high: int | None = None) -> None:
    value = getattr(args, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        valid = f"in {low}..{high}" if high is not None else f"of at least {low}"
        raise ValueError(f"{setting_name(name)} must be an integer {valid}, got {value!r}")


def _check_number(args: EngineArgs, name: str, low: float, *, inclusive: bool = True) -> None:
    value = getattr(args, name)
    valid = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or value < low or (not inclusive and value == low):
        bound = f"at least {low:g}" if inclusive else f"above {low:g}"
        raise ValueError(f"{setting_name(name)} must be a finite number {bound}, got {value!r}")
