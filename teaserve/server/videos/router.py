"""Routes of the Videos API; the logic lives in VideoServing."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..protocol import ErrorResponse
from .protocol import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    VARIANT_MEDIA_TYPES,
    Variant,
    Video,
    VideoCreateRequest,
    VideoDeleted,
    VideoList,
)
from .serving import VideoServing
from .store import VIDEO_ID

router = APIRouter(tags=["videos"])

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 409, 413, 429, 500, 503)
}
_FORM_FIELDS = {
    name: {"type": "string", "description": field.description or ""}
    for name, field in VideoCreateRequest.model_fields.items()
    if name != "input_reference"
}
_CREATE_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["prompt"],
                    "properties": {
                        "input_reference": {"type": "string", "format": "binary"},
                        "input_reference[image_url]": {"type": "string", "description": "a data: URL"},
                        **_FORM_FIELDS,
                    },
                }
            },
            "application/json": {"schema": VideoCreateRequest.model_json_schema()},
        },
    }
}
_CONTENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {media_type: {} for media_type in VARIANT_MEDIA_TYPES.values()}},
    **ERRORS,
}


AFTER = Query(pattern=f"^{VIDEO_ID.pattern}$", description="the last id of the previous page")


def _serving(request: Request) -> VideoServing:
    return request.app.state.video_serving


@router.post("/v1/videos", response_model=Video, responses=ERRORS, openapi_extra=_CREATE_SCHEMA)
async def create_video(request: Request) -> Response:
    """Queue a video (multipart as the OpenAI SDK sends it, or JSON); poll it with GET /v1/videos/{video_id}."""
    return await _serving(request).create(request)


@router.get("/v1/videos", response_model=VideoList, responses=ERRORS)
async def list_videos(
    request: Request,
    after: Annotated[
        str | None, Query(pattern=f"^{VIDEO_ID.pattern}$", description="the last id of the previous page")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST_LIMIT)] = DEFAULT_LIST_LIMIT,
    order: Annotated[Literal["asc", "desc"], Query(description="by creation time")] = "desc",
) -> VideoList:
    return await _serving(request).list(after, limit, order)


@router.get("/v1/videos/{video_id}", response_model=Video, responses=ERRORS)
async def retrieve_video(video_id: str, request: Request) -> Response:
    return await _serving(request).retrieve(video_id)


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses=ERRORS)
async def delete_video(video_id: str, request: Request) -> VideoDeleted:
    """Delete a video and its files; one not yet finished is cancelled."""
    return await _serving(request).delete(video_id)


@router.get("/v1/videos/{video_id}/content", response_class=Response, responses=_CONTENT_RESPONSES)
async def download_video_content(video_id: str, request: Request, variant: Variant = "video") -> Response:
    """The MP4 (variant=video), a PNG of the first frame (thumbnail) or a JPEG grid of frames (spritesheet)."""
    return await _serving(request).content(video_id, variant)
