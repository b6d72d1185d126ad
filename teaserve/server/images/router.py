"""Routes of the Images API; the logic lives in ImageServing."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..protocol import ErrorResponse
from .protocol import ImageEditRequest, ImageGenerationRequest, ImagesResponse
from .serving import ImageServing

router = APIRouter(tags=["images"])

STREAM_EVENT = {
    "type": "object",
    "description": "One server-sent event of a `stream: true` answer: `event` is image_generation.partial_image, "
    "image_generation.completed (image_edit.* for edits) and `data` its JSON; a failure after the stream began "
    "is an event whose `data` is an OpenAI error object.",
    "properties": {"event": {"type": "string"}, "data": {"type": "string", "contentMediaType": "application/json"}},
    "required": ["data"],
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": STREAM_EVENT}}},
    **{status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 429, 500, 503)},
}

_EDIT_FORM_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "prompt"],
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "mask": {"type": "string", "format": "binary"},
                        **{
                            name: {"type": "string", "description": field.description or ""}
                            for name, field in ImageEditRequest.model_fields.items()
                        },
                    },
                }
            }
        },
    }
}


def _serving(request: Request) -> ImageServing:
    return request.app.state.image_serving


@router.post("/v1/images/generations", response_model=ImagesResponse, responses=RESPONSES)
async def create_image(body: ImageGenerationRequest, request: Request) -> Response:
    """Generate images from a prompt (JSON). `stream: true` answers with server-sent events."""
    return await _serving(request).generate(body, request)


@router.post("/v1/images/edits", response_model=ImagesResponse, responses=RESPONSES, openapi_extra=_EDIT_FORM_SCHEMA)
async def create_image_edit(request: Request) -> Response:
    """Edit one or several images (multipart: `image` or `image[]`, optional `mask`, `prompt`, options)."""
    return await _serving(request).edit(request)
