"""Request, output, progress and error types of the engine."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from .images import open_image
from .params import MAX_PROMPT_CHARS, OmniDiffusionSamplingParams


class RequestCancelledError(Exception):
    """The request was cancelled before it finished."""


class QueueFullError(Exception):
    """The engine's queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(RuntimeError):
    """The engine has shut down."""


class GenerationError(RuntimeError):
    """The pipeline failed while running a request (the engine goes on with the next one)."""


class RequestTimeoutError(GenerationError):
    """The request passed its deadline before it finished."""


class DeviceOutOfMemoryError(GenerationError):
    """The device ran out of memory while running the request; a smaller or later request may fit."""


def new_request_id() -> str:
    return str(uuid.uuid4())


@dataclass
class PromptInput:
    """One prompt with its optional negative prompt, input images and mask."""

    prompt: str
    negative_prompt: str | None = None
    images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is {len(self.prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")

    @classmethod
    def from_user(cls, value: str | dict[str, Any] | PromptInput) -> PromptInput:
        """Accept a string, or a dict {"prompt", "negative_prompt", "multi_modal_data": {"image", "mask"}}."""
        if isinstance(value, PromptInput):
            return value
        if isinstance(value, str):
            return cls(prompt=value)
        if not isinstance(value, dict):
            raise ValueError(f"a prompt must be a string or a dict, got {type(value).__name__}")
        unknown = set(value) - {"prompt", "negative_prompt", "multi_modal_data"}
        if unknown:
            raise ValueError(
                f"unknown prompt key(s) {sorted(unknown)}; valid keys: prompt, negative_prompt, multi_modal_data"
            )
        if "prompt" not in value:
            raise ValueError("a prompt dict needs a 'prompt' key")
        media = value.get("multi_modal_data") or {}
        unknown = set(media) - {"image", "mask"}
        if unknown:
            raise ValueError(f"unknown multi_modal_data key(s) {sorted(unknown)}; valid keys: image, mask")
        images = media.get("image") or []
        if not isinstance(images, list | tuple):
            images = [images]
        mask = media.get("mask")
        return cls(
            prompt=value["prompt"],
            negative_prompt=value.get("negative_prompt"),
            images=[open_image(image) for image in images],
            mask=None if mask is None else open_image(mask, param="mask"),
        )


@dataclass
class GenerationRequest:
    """A request resolved against the loaded model: every setting is concrete."""

    prompt: PromptInput
    params: OmniDiffusionSamplingParams
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float
    negative_prompt: str | None
    guidance_scale: float | None
    seed: int
    num_outputs: int
    layers: int | None = None
    resolution: int | None = None
    preview_steps: frozenset[int] = frozenset()
    """0-based steps after which a preview image is decoded and sent with the progress event."""
    request_id: str = field(default_factory=new_request_id)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + index for index in range(self.num_outputs)]


@dataclass
class RequestMetrics:
    queue_seconds: float
    seconds: float
    """Time the worker spent on the request (pipeline call included)."""
    num_inference_steps: int
    steps: int
    """Denoising steps completed."""
    transformer_calls: int
    transformer_seconds: float | None = None
    """Time inside the transformer (device-synchronised); measured only by engines built with profile=True."""
    cache: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str
    images: list[Image.Image]
    seed: int
    seeds: list[int]
    """The seed of each image: regenerate image i alone with seeds[i]."""
    width: int
    height: int
    metrics: RequestMetrics


@dataclass
class ProgressEvent:
    request_id: str
    step: int
    """Steps completed so far (1-based)."""
    total: int
    previews: list[Image.Image] | None = None
