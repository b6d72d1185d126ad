"""Pure ASGI middleware: request ids, body-size limit, API-key authentication."""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import _body

REQUEST_ID_HEADER = b"x-request-id"


async def _send_error(send: Send, status: int, message: str, code: str | None, headers=()) -> None:
    payload = json.dumps(_body(status, message, None, code)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class RequestIdMiddleware:
    """Echo the client's X-Request-Id, or create one; handlers find it in `request.state.request_id`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"").decode("latin-1").strip()
        request_id = given[:200] or str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        scope["state"]["client_request_id"] = bool(given)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())],
                }
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, 413, message, "request_too_large", [(b"connection", b"close")])
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the body reader: FastAPI passes HTTP exceptions through to the error handlers.
                    raise HTTPException(413, message)
            return incoming

        await self.app(scope, counting_receive, send)


class ApiKeyMiddleware:
    """Require `Authorization: Bearer <key>` on the API (paths under /v1); health, ready and metrics stay open."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            given = hashlib.sha256(token.strip().encode()).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(given, self._digest):
                return await _send_error(
                    send,
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer <key>'",
                    "invalid_api_key",
                    [(b"www-authenticate", b"Bearer")],
                )
        await self.app(scope, receive, send)
