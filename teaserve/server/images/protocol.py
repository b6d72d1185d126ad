"""Wire models of the OpenAI Images API, plus teaserve's extensions (what the SDK's `extra_body` sends)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...engine.params import MAX_OUTPUTS, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS

OutputFormat = Literal["png", "jpeg", "webp"]


class ImageRequestFields(BaseModel):
    """Fields shared by generations and edits. Unknown fields are refused with a 400 that names them."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a boolean is no number, "4" no integer

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_OUTPUTS)
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT" or "auto"')
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(default=None, ge=0, le=100)
    background: Literal["transparent", "opaque", "auto"] | None = None
    quality: Literal["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    stream: bool = False
    partial_images: int = Field(default=0, ge=0, le=3)
    # teaserve extensions
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    true_cfg_scale: float | None = Field(default=None, ge=0, le=100)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    cache_config: dict[str, Any] | None = Field(
        default=None, description='per-request cache overrides, e.g. {"rel_l1_thresh": 0.4} or {"enabled": false}'
    )
    layers: int | None = Field(default=None, ge=2, le=10, description="Qwen-Image-Layered: number of layers")
    resolution: int | None = Field(default=None, description="Qwen-Image-Layered: 640 or 1024")


class ImageGenerationRequest(ImageRequestFields):
    style: Literal["vivid", "natural"] | None = None
    moderation: Literal["low", "auto"] | None = None


class ImageEditRequest(ImageRequestFields):
    """The text fields of a multipart edit request (the files come separately)."""

    input_fidelity: Literal["high", "low"] | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int
    """teaserve: the seed that regenerates this image alone."""


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["transparent", "opaque"]
    output_format: OutputFormat
    size: str
    quality: str | None = None
    # teaserve extensions (the SDK keeps unknown fields)
    id: str
    model: str
    metrics: dict[str, Any]
    cache: dict[str, Any] | None = None
