"""Wire models of the OpenAI Videos API, plus teaserve's extensions (what the SDK's `extra_body` sends).

The server answers with its own models rather than the SDK's types: those only allow OpenAI's sizes and durations.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...engine.params import MAX_PROMPT_CHARS, SamplingFields, shown_value

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]
FINAL_STATUSES: tuple[VideoStatus, ...] = ("completed", "failed")
Variant = Literal["video", "thumbnail", "spritesheet"]
VARIANT_MEDIA_TYPES: dict[str, str] = {"video": "video/mp4", "thumbnail": "image/png", "spritesheet": "image/jpeg"}

MAX_SECONDS = 3600.0
"""The schema's ceiling on a duration; the frames it makes are bounded by the model and the server's limits."""
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 20, 100


class ImageReference(BaseModel):
    """`input_reference` as an object: an image given by a data: URL (`file_id`s are not stored by this server)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image_url: str | None = None
    file_id: str | None = None


class VideoCreateRequest(SamplingFields):
    """The fields of `POST /v1/videos`: OpenAI's, then teaserve's sampling fields (`SamplingFields`, the schema of the
    Python API). Any other field is a model-only parameter that the served model's family checks (`num_frames`,
    `fps`); one it does not take is refused with a 400 that names it. The `input_reference` file part of a
    multipart request comes separately."""

    model_config = ConfigDict(extra="allow", frozen=False, strict=True)  # a boolean is no number, "4" no integer

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    seconds: float | None = Field(
        default=None,
        description='duration in seconds, e.g. "4" (default: the model\'s frame count); num_frames overrides it',
    )
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT" (default: the model\'s size)')
    input_reference: ImageReference | None = Field(
        default=None, description='image-to-video: the first frame, as {"image_url": "data:image/png;base64,..."}'
    )

    @field_validator("seconds", mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        """OpenAI sends seconds as a string ("4"); JSON clients may send a number."""
        if value is None:
            return None
        number: Any = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        valid = isinstance(number, int | float) and not isinstance(number, bool) and math.isfinite(number)
        if not valid or not 0 < number <= MAX_SECONDS:
            raise ValueError(
                f'seconds must be a number of seconds above 0 and at most {MAX_SECONDS:g}, e.g. "4", '
                f"got {shown_value(value)}"
            )
        return float(number)

    @property
    def model_knobs(self) -> dict[str, Any]:
        """The fields that are neither OpenAI's nor teaserve's sampling fields."""
        return dict(self.model_extra or {})


class VideoError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    id: str
    object: Literal["video"] = "video"
    model: str
    status: VideoStatus
    progress: int = Field(ge=0, le=100, description="approximate percentage of the work done")
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str
    seconds: str
    size: str
    remixed_from_video_id: str | None = None
    error: VideoError | None = None
    # teaserve extensions (the SDK keeps unknown fields)
    num_frames: int
    fps: int
    seed: int
    """The seed that regenerates this video."""


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    has_more: bool
    first_id: str | None
    last_id: str | None


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool
