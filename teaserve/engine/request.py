"""Request, output and progress types of the engine."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from PIL import Image

from .errors import InvalidParameterError
from .images import ImageSource
from .params import MAX_PROMPT_CHARS, OmniDiffusionSamplingParams
from .video import GeneratedVideo


def new_request_id() -> str:
    return str(uuid.uuid4())


@dataclass
class PromptInput:
    """One prompt with its optional negative prompt, input images and mask, as the user gave them (the engine
    checks and decodes the images when it prepares the request)."""

    prompt: str
    negative_prompt: str | None = None
    images: list[ImageSource] = field(default_factory=list)
    mask: ImageSource | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidParameterError(f"prompt must be a string, got {type(self.prompt).__name__}", "prompt")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidParameterError(
                f"prompt is {len(self.prompt)} characters long; the limit is {MAX_PROMPT_CHARS}", "prompt"
            )
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidParameterError(
                f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}", "negative_prompt"
            )

    @classmethod
    def from_user(cls, value: str | dict[str, Any] | PromptInput) -> PromptInput:
        """Accept a string, or a dict {"prompt", "negative_prompt", "multi_modal_data": {"image", "mask"}}."""
        if isinstance(value, PromptInput):
            return value
        if isinstance(value, str):
            return cls(prompt=value)
        if not isinstance(value, dict):
            raise InvalidParameterError(f"a prompt must be a string or a dict, got {type(value).__name__}", "prompt")
        unknown = set(value) - {"prompt", "negative_prompt", "multi_modal_data"}
        if unknown:
            raise InvalidParameterError(
                f"unknown prompt key(s) {sorted(unknown)}; valid keys: prompt, negative_prompt, multi_modal_data",
                "prompt",
            )
        if "prompt" not in value:
            raise InvalidParameterError("a prompt dict needs a 'prompt' key", "prompt")
        media = value.get("multi_modal_data") or {}
        unknown = set(media) - {"image", "mask"}
        if unknown:
            raise InvalidParameterError(
                f"unknown multi_modal_data key(s) {sorted(unknown)}; valid keys: image, mask", "image"
            )
        images = media.get("image") or []
        return cls(
            prompt=value["prompt"],
            negative_prompt=value.get("negative_prompt"),
            images=list(images) if isinstance(images, list | tuple) else [images],
            mask=media.get("mask"),
        )


@dataclass
class GenerationRequest:
    """A request resolved against the loaded model: every setting is concrete, the input images are decoded."""

    prompt: str
    params: OmniDiffusionSamplingParams
    width: int
    height: int
    num_inference_steps: int
    true_cfg_scale: float
    negative_prompt: str | None
    guidance_scale: float | None
    seed: int
    num_outputs: int
    images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None
    model_knobs: dict[str, Any] = field(default_factory=dict)
    """The model-only parameters, validated by the model's family, defaults filled in."""
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
    """Transformer evaluations of the request's CFG branches: a call that carries both branches counts twice."""
    transformer_seconds: float | None = None
    """Time inside the transformer (device-synchronised); measured only by engines built with profile=True."""
    cache: dict[str, Any] | None = None
    batch_size: int = 1
    """Requests that ran together in one batched pipeline call (seconds and transformer counts are the batch's)."""

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
    videos: list[GeneratedVideo] = field(default_factory=list)
    """A video model's outputs (then `images` is empty): video i was made with seeds[i]."""


@dataclass
class ProgressEvent:
    request_id: str
    step: int
    """Steps completed so far (1-based)."""
    total: int
    previews: list[Image.Image] | None = None
