"""The playground: one page, its script and its style sheet, served from the package (no build step, nothing fetched
from elsewhere). The page itself is public; every API call it makes carries the key typed into it, so `--api-key`
keeps the API protected."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from ...engine.params import shown_value
from ..errors import OpenAIError

ASSET_PREFIX = "/playground/"
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
"""The files of the page and their content types."""

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        # images arrive as base64 in JSON (data:), uploads and videos are shown from object URLs (blob:)
        "img-src 'self' data: blob:",
        "media-src 'self' blob:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _read_assets() -> dict[str, bytes]:
    folder = resources.files(__package__).joinpath("static")
    return {name: folder.joinpath(name).read_bytes() for name in ASSETS}


def playground_router() -> APIRouter:
    """Routes of the page: GET / and GET /playground/{file}; the files are read once, here."""
    router = APIRouter(include_in_schema=False)
    contents = _read_assets()

    def asset(name: str) -> Response:
        return Response(contents[name], media_type=ASSETS[name], headers=HEADERS)

    @router.get("/")
    async def page() -> Response:
        return asset("index.html")

    @router.get(ASSET_PREFIX + "{name}")
    async def page_file(name: str) -> Response:
        if name not in contents:
            raise OpenAIError(404, f"the playground has no file {shown_value(name)}")
        return asset(name)

    return router
