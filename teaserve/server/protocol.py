"""Wire models shared by every endpoint: errors and the model list."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class CacheCard(BaseModel):
    """The served model's cache backend and what a request may set in its `cache_config`."""

    backend: str
    request_keys: list[str] = Field(description="the keys a request's cache_config may carry")
    tuning_key: str | None = Field(description="the key that trades speed for quality (larger = faster)")
    defaults: dict[str, Any] = Field(description="the value of each request key a request leaves out")
    quality_target: float | None = Field(
        description="the default quality target (dB against uncached) that chooses the tuning value, if any"
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "teaserve"
    # teaserve extensions (the SDK keeps unknown fields)
    architecture: str
    can_edit: bool
    max_input_images: int
    default_size: str
    makes_video: bool
    cache: CacheCard


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
