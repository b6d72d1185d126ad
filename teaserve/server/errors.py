"""OpenAI-shaped errors: every failure answers {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import (
    DeviceOutOfMemoryError,
    EngineStoppedError,
    GenerationError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    WorkerLostError,
)
from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}

SHUTDOWN_RETRY_AFTER_SECONDS = 5
"""Retry-After while the server is going away: long enough for a restart or for a balancer to route elsewhere."""
OUT_OF_MEMORY_RETRY_AFTER_SECONDS = 10
WORKER_LOST_RETRY_AFTER_SECONDS = 1
"""Retry-After when the worker running a request died: the other workers take the retry."""


class OpenAIError(Exception):
    """An error to answer with the given status in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, headers=self.headers)

    def body(self) -> dict:
        return _body(self.status, self.message, self.param, self.code)


def _body(status: int, message: str, param: str | None, code: str | None) -> dict:
    error_type = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param, code=code)).model_dump()


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None, headers=None
) -> JSONResponse:
    return JSONResponse(_body(status, message, param, code), status_code=status, headers=headers)


def _validation_message(error: Mapping[str, Any]) -> tuple[str, str | None]:
    location = [str(part) for part in error.get("loc", ())]
    if location[:1] in (["body"], ["query"], ["path"]):  # where FastAPI found it; the parameter is what follows
        location = location[1:]
    param = ".".join(location) or None
    if error.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}", None
    if not location:  # the body as a whole: absent, or not a JSON object
        given = error.get("input")
        if error.get("type") == "missing" or given in (None, b""):
            return 'the request body is empty: send a JSON object such as {"prompt": "a cat"}', None
        if isinstance(given, bytes):
            return "the request body must be a JSON object sent with Content-Type: application/json", None
        return f"the request body must be a JSON object, got a JSON {_json_type(given)}", None
    if error.get("type") == "extra_forbidden":
        return f"unknown parameter {param!r}", param
    if error.get("type") == "missing":
        return f"missing required parameter {param!r}", param
    cause = error.get("ctx", {}).get("error")
    if error.get("type") == "value_error" and isinstance(cause, ValueError):  # a validator's own message
        return str(cause), param
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"{param}: {error.get('msg')} (got {shown})" if param else str(error.get("msg")), param


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return names.get(type(value), type(value).__name__)


def engine_error(error: Exception, request_id: str) -> OpenAIError:
    """The answer to a request the engine did not finish, chosen by the error's type.

    5xx messages say what failed and name the request id; why it failed is in the server log under that id.
    """
    if isinstance(error, QueueFullError):
        return OpenAIError(429, str(error), code="queue_full", headers={"retry-after": str(error.retry_after)})
    if isinstance(error, EngineStoppedError | RequestCancelledError):  # cancelled: the server stopped mid-request
        return OpenAIError(
            503,
            f"the server is shutting down; request {request_id} did not run to the end, retry on another instance",
            code="shutting_down",
            headers={"retry-after": str(SHUTDOWN_RETRY_AFTER_SECONDS)},
        )
    if isinstance(error, RequestTimeoutError):
        return OpenAIError(
            503,
            f"request {request_id} did not finish within the server's time limit and was stopped",
            code="request_timeout",
            headers={"x-should-retry": "false"},  # the same request would run out of time again
        )
    if isinstance(error, DeviceOutOfMemoryError):
        return OpenAIError(
            503,
            f"the device ran out of memory while running request {request_id}; retry later or ask for less",
            code="out_of_memory",
            headers={"retry-after": str(OUT_OF_MEMORY_RETRY_AFTER_SECONDS)},
        )
    if isinstance(error, WorkerLostError):
        return OpenAIError(
            503,
            f"the model worker running request {request_id} stopped before it finished; retry",
            code="worker_lost",
            headers={"retry-after": str(WORKER_LOST_RETRY_AFTER_SECONDS)},
        )
    if isinstance(error, GenerationError):
        return OpenAIError(
            500,
            f"the generation of request {request_id} failed; the server log has the details",
            code="generation_failed",
            headers={"x-should-retry": "false"},  # deterministic failures would fail again
        )
    logger.error("request %s failed", request_id, exc_info=error)
    return internal_error(request_id)


def internal_error(request_id: str) -> OpenAIError:
    return OpenAIError(
        500,
        f"internal server error while handling request {request_id}; the server log has the details",
        code="internal_error",
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = error.errors()
        message, param = _validation_message(errors[0]) if errors else ("invalid request", None)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
        return error_response(error.status_code, message, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        request_id = getattr(request.state, "request_id", "-")
        logger.error("request %s to %s failed", request_id, request.url.path, exc_info=error)
        return internal_error(request_id).response()
