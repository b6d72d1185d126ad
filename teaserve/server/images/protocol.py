"""Wire models of the OpenAI Images API, plus teaserve's extensions (what the SDK's `extra_body` sends)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ...engine.params import MAX_PROMPT_CHARS, OutputCount, SamplingFields

OutputFormat = Literal["png", "jpeg", "webp"]


class ImageRequestFields(SamplingFields):
    """Fields shared by generations and edits: OpenAI's, then teaserve's sampling fields (`SamplingFields`, the
    schema of the Python API). Any other field is a model-only parameter that the served model's family checks
    (e.g. `layers` of a layered model); one it does not take is refused with a 400 that names it."""

    model_config = ConfigDict(extra="allow", frozen=False, strict=True)  # a boolean is no number, "4" no integer

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    n: OutputCount = 1
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
    stream_progress: bool = Field(
        default=False,
        description="teaserve: with stream, also send an image_generation.progress event (image_edit.progress for "
        "edits) after every denoising step, with `step` (steps done) and `num_steps`",
    )

    @property
    def model_knobs(self) -> dict[str, Any]:
        """The fields that are neither OpenAI's nor teaserve's sampling fields."""
        return dict(self.model_extra or {})


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
