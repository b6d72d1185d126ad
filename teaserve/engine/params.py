"""The sampling-parameter schema: one pydantic model serves the Python API, the engine, the HTTP protocol and the CLI.

Bounds are declared once, as Field constraints. They are the schema's own ceilings; what a server actually
accepts is narrowed per deployment by its limits (`EngineArgs`), checked when a request is prepared.
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Le, MaxLen
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, model_validator
from pydantic.fields import FieldInfo

from .errors import InvalidParameterError

MAX_STEPS = 1000
MAX_OUTPUTS = 10
MAX_SIDE = 65536
"""The schema's ceiling on a side; the server's pixel and aspect-ratio limits decide what it serves."""
MAX_SEED = 2**63 - 1
MAX_SCALE = 100.0
MAX_PROMPT_CHARS = 32000

OutputCount = Annotated[StrictInt, Field(ge=1, le=MAX_OUTPUTS)]
"""Images per prompt: `num_outputs_per_prompt` in Python, `n` over HTTP."""

WIRE_NAMES = {"width": "size", "height": "size", "num_outputs_per_prompt": "n"}
"""Python field names whose HTTP parameter has another name; errors carry the HTTP name."""

_SIZE = re.compile(r"\s*([0-9]{1,9})\s*[xX]\s*([0-9]{1,9})\s*")


class SamplingFields(BaseModel):
    """The sampling parameters named alike in Python, over HTTP (OpenAI `extra_body`) and on the command line."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_inference_steps: StrictInt | None = Field(
        default=None, ge=1, le=MAX_STEPS, description="denoising steps (default: the model's)"
    )
    seed: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="base seed: image i uses seed + i; drawn and reported when omitted; 0 is a real seed",
    )
    negative_prompt: str | None = Field(
        default=None, max_length=MAX_PROMPT_CHARS, description="text for true CFG (default: the model's)"
    )
    true_cfg_scale: StrictFloat | None = Field(
        default=None,
        ge=0,
        le=MAX_SCALE,
        allow_inf_nan=False,
        description="true classifier-free guidance scale; CFG runs when > 1 with a negative prompt",
    )
    guidance_scale: StrictFloat | None = Field(
        default=None,
        ge=0,
        le=MAX_SCALE,
        allow_inf_nan=False,
        description="embedded guidance of guidance-distilled models; image guidance of others",
    )
    cache_config: dict[str, Any] | None = Field(
        default=None,
        description='per-request cache overrides, e.g. {"rel_l1_thresh": 0.4} or {"enabled": false}',
    )


class OmniDiffusionSamplingParams(SamplingFields):
    """What a user may choose for one generation; validated on construction. Fields left None take the model's
    defaults.

    num_inference_steps: denoising steps (the model's default when None).
    height, width: output size in pixels (both or neither); the model decides the multiple, the engine's limits
        the largest size.
    seed: base seed; image i of a request uses seed + i. None draws one and reports it. 0 is a real seed.
    negative_prompt: text for true CFG; None uses the model's recommended one.
    true_cfg_scale: true classifier-free guidance scale; CFG runs when > 1 with a negative prompt.
    guidance_scale: embedded guidance of guidance-distilled models (Flux); image guidance of others.
    num_outputs_per_prompt: images per prompt.
    cache_config: per-request cache overrides, e.g. {"rel_l1_thresh": 0.4} or {"enabled": false}.
    Any other keyword is a model-only parameter (`model_knobs`), declared and checked by the model's family
    when the request is prepared, e.g. `layers=4` for a layered model.

    A bad value raises an InvalidParameterError (a ValueError) that names the parameter and its valid range.
    """

    height: StrictInt | None = Field(default=None, ge=1, le=MAX_SIDE, description="output height in pixels")
    width: StrictInt | None = Field(default=None, ge=1, le=MAX_SIDE, description="output width in pixels")
    num_outputs_per_prompt: OutputCount = Field(default=1, description="images per prompt")
    model_knobs: dict[str, Any] = Field(
        default_factory=dict, description="model-only parameters, declared and checked by the model's family"
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise parameter_error(error, type(self), WIRE_NAMES) from None

    @model_validator(mode="before")
    @classmethod
    def _collect_model_knobs(cls, data: Any) -> Any:
        """Keywords that are not sampling parameters are the model's own knobs."""
        if not isinstance(data, dict):
            return data
        knobs = {name: value for name, value in data.items() if name not in cls.model_fields}
        if not knobs:
            return data
        declared = {name: value for name, value in data.items() if name in cls.model_fields}
        return {**declared, "model_knobs": {**(declared.get("model_knobs") or {}), **knobs}}

    @model_validator(mode="after")
    def _both_sides_or_neither(self) -> OmniDiffusionSamplingParams:
        if (self.width is None) != (self.height is None):
            raise InvalidParameterError("give both width and height, or neither (the model's default size)", "size")
        return self

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.width is None or self.height is None else (self.width, self.height)

    def replace(self, **changes: Any) -> OmniDiffusionSamplingParams:
        """A copy with `changes` applied, validated like a new instance."""
        return type(self)(**{**dict(self), **changes})


def parse_size(text: str) -> tuple[int, int]:
    """Parse "WIDTHxHEIGHT" (ASCII digits, e.g. "1024x768") into (width, height); the params check the values."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidParameterError(
            f"size must look like WIDTHxHEIGHT with each side at most {MAX_SIDE}, e.g. 1024x1024, got {text!r}", "size"
        )
    return int(match[1]), int(match[2])


def values_from_strings(model: type[BaseModel], values: Mapping[str, str]) -> dict[str, Any]:
    """Text values (form fields, command-line flags) as the JSON values they spell, for strict validation.

    Fields typed as text stay text; every other value is parsed as JSON when it is JSON ("4" -> 4, "true" -> True)
    and stays text otherwise, so that validation names the parameter and what it expects.
    """
    parsed: dict[str, Any] = {}
    for name, text in values.items():
        field = model.model_fields.get(name)
        if field is not None and _base_type(field.annotation) is str:
            parsed[name] = text
            continue
        parsed[name] = json_or_text(text)
    return parsed


def json_or_text(text: str) -> Any:
    """The JSON value `text` spells, else `text` itself (validation then says what was expected)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, too many digits, or nested too deep
        return text


# -- clear messages from validation errors ---------------------------------------------------------------------
def parameter_error(
    error: ValidationError, model: type[BaseModel], wire_names: Mapping[str, str] | None = None
) -> InvalidParameterError:
    """The first problem of `error` as an InvalidParameterError naming the parameter and its valid values."""
    details = error.errors()[0]
    cause = details.get("ctx", {}).get("error")
    if isinstance(cause, InvalidParameterError):
        return cause
    location = details["loc"]
    name = str(location[0]) if location else model.__name__
    field = model.model_fields.get(name)
    if details["type"] == "value_error" and isinstance(cause, ValueError):  # a validator's own message
        message = str(cause)
    elif details["type"] == "extra_forbidden" or field is None:
        message = f"unknown parameter {name!r}; valid parameters: {', '.join(model.model_fields)}"
    elif len(location) == 1:
        message = f"{name} must be {describe_field(field)}, got {shown_value(details['input'])}"
    else:
        message = (
            f"{name}: {details['msg']} at {'.'.join(map(str, location[1:]))} (got {shown_value(details['input'])})"
        )
    return InvalidParameterError(message, (wire_names or {}).get(name, name))


def describe_field(field: FieldInfo) -> str:
    """What a field accepts, from its declaration: "an integer in 1..1000", "one of 640, 1024", ..."""
    low = next((m.ge for m in field.metadata if isinstance(m, Ge)), None)
    high = next((m.le for m in field.metadata if isinstance(m, Le)), None)
    span = f" in {low:g}..{high:g}" if low is not None and high is not None else ""
    base = _base_type(field.annotation)
    if get_origin(base) is Literal:
        return "one of " + ", ".join(map(str, get_args(base)))
    if base is int:
        span = f" in {low}..{high}" if low is not None and high is not None else ""
        return f"an integer{span}"
    if base is float:
        return f"a finite number{span}"
    if base is str:
        longest = next((m.max_length for m in field.metadata if isinstance(m, MaxLen)), None)
        return "a string" + ("" if longest is None else f" of at most {longest} characters")
    if base is dict or get_origin(base) is dict:
        return "an object"
    return f"of type {getattr(base, '__name__', base)}"


def _base_type(annotation: Any) -> Any:
    """`int` for `int | None`, `Annotated[int, ...]` and friends."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _base_type(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        members = [member for member in get_args(annotation) if member is not type(None)]
        return _base_type(members[0]) if len(members) == 1 else annotation
    return annotation


def shown_value(value: Any) -> str:
    """`value` for an error message, cut to 80 characters."""
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
