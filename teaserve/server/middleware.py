"""Pure ASGI middleware: request ids, body size and read-time limits, API-key authentication."""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
import uuid

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import _body

REQUEST_ID_HEADER = b"x-request-id"
API_KEY_ENV = "TEASERVE_API_KEY"
"""The environment variable with the API key a server requires when none is given."""


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
    """Echo the client's X-Request-Id, or create one; handlers find it in `request.state.request_id`.

    `answer_header=False` leaves the answer's header to a proxy in front that sets it itself."""

    def __init__(self, app: ASGIApp, answer_header: bool = True):
        self.app, self.answer_header = app, answer_header

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"").decode("latin-1").strip()
        request_id = given[:200] or str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        scope["state"]["client_request_id"] = bool(given)
        if not self.answer_header:
            return await self.app(scope, receive, send)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REQUEST_ID_HEADER, request_id.encode())],
                }
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`, whether announced by Content-Length or streamed; 408 (and the
    connection closed) when the whole body has not arrived `read_timeout` seconds after the app began reading it."""

    def __init__(self, app: ASGIApp, max_bytes: int, read_timeout: float):
        self.app, self.max_bytes, self.read_timeout = app, max_bytes, read_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"the request body is larger than the limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, 413, message, "request_too_large", [(b"connection", b"close")])
        received, deadline, complete = 0, None, False

        async def limited_receive() -> Message:
            nonlocal received, deadline, complete
            if complete:  # the body is in: what follows is a wait for the disconnect, as long as the answer takes
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + self.read_timeout
            try:
                incoming = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                # Raised inside the body reader: FastAPI passes HTTP exceptions through to the error handlers.
                raise HTTPException(
                    408,
                    f"the request body did not arrive within {self.read_timeout:g} s",
                    headers={"connection": "close"},
                ) from None
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                complete = not incoming.get("more_body", False)
                if received > self.max_bytes:
                    raise HTTPException(413, message)
            return incoming

        await self.app(scope, limited_receive, send)


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
