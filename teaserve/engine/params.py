"""User-facing sampling parameters, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MAX_STEPS = 1000
MAX_OUTPUTS = 10
SIZE_MULTIPLE = 16
MAX_PIXELS = 4096 * 4096
"""Cap on width x height of generated images and on decoded input images."""
MAX_SEED = 2**63 - 1
LAYER_RANGE = (2, 10)
RESOLUTIONS = (640, 1024)
MAX_PROMPT_CHARS = 32000


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _check_scale(name: str, value: Any, high: float = 100.0) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number in 0..{high:g}, got {value!r}")
    if not 0 <= value <= high:
        raise ValueError(f"{name} must be a number in 0..{high:g}, got {value!r}")


def check_size(width: int, height: int, multiple: int = SIZE_MULTIPLE) -> None:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
    if width * height > MAX_PIXELS:
        raise ValueError(f"size {width}x{height} is over the cap of {MAX_PIXELS} pixels (e.g. 4096x4096)")


def parse_size(text: str) -> tuple[int, int]:
    """Parse "WIDTHxHEIGHT" (e.g. "1024x768") into (width, height); the values are checked by the params."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"size must look like WIDTHxHEIGHT, e.g. 1024x1024, got {text!r}")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True)
class OmniDiffusionSamplingParams:
    """What a user may choose for one generation. Fields left as None take the model's defaults.

    num_inference_steps: denoising steps (1..1000; the model's default, 50 for Qwen-Image, when None).
    height, width: output size in pixels, multiples of 16, at most 4096x4096 pixels in all.
    seed: base seed; image i of a request uses seed + i. None draws one and reports it. 0 is a real seed.
    negative_prompt: text for true CFG; None uses the model's recommended one.
    true_cfg_scale: true classifier-free guidance scale; CFG runs when > 1 with a negative prompt.
    guidance_scale: embedded guidance of guidance-distilled models (Flux); ignored by others.
    num_outputs_per_prompt: images per prompt (1..10).
    layers, resolution: Qwen-Image-Layered only (2..10 layers; 640 or 1024).
    cache_config: per-request cache overrides, e.g. {"rel_l1_thresh": 0.4} or {"enabled": false}.
    """

    num_inference_steps: int | None = None
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    guidance_scale: float | None = None
    num_outputs_per_prompt: int = 1
    layers: int | None = None
    resolution: int | None = None
    cache_config: dict[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        if self.num_inference_steps is not None:
            _check_int("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        if (self.width is None) != (self.height is None):
            raise ValueError("give both width and height, or neither (the model's default size)")
        if self.width is not None:
            check_size(self.width, self.height)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        if self.true_cfg_scale is not None:
            _check_scale("true_cfg_scale", self.true_cfg_scale)
        if self.guidance_scale is not None:
            _check_scale("guidance_scale", self.guidance_scale)
        _check_int("num_outputs_per_prompt", self.num_outputs_per_prompt, 1, MAX_OUTPUTS)
        if self.layers is not None:
            _check_int("layers", self.layers, *LAYER_RANGE)
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {', '.join(map(str, RESOLUTIONS))}, got {self.resolution!r}")
        if self.cache_config is not None and not isinstance(self.cache_config, dict):
            raise ValueError(f"cache_config must be a dict of cache settings, got {type(self.cache_config).__name__}")
