"""The engine's errors. Client mistakes are `InvalidParameterError`s that name their parameter; failures of the
model are `GenerationError`s whose message never carries internal exception text (that goes to the log). Every one
pickles with its fields, so that it reaches a client of an engine in another process intact."""

from __future__ import annotations


class InvalidParameterError(ValueError):
    """A request the engine refuses; `param` is the parameter's wire name ("size", "n", "image", "cache_config")."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param

    def __reduce__(self):
        return type(self), (str(self), self.param)


class InvalidImageError(InvalidParameterError):
    """An input image that cannot be used; `param` names the input it came from ("image" or "mask")."""

    def __init__(self, message: str, param: str = "image"):
        super().__init__(message, param)


class GenerationError(RuntimeError):
    """The pipeline failed while running a request (the engine goes on with the next one)."""


class RequestTimeoutError(GenerationError):
    """The request ran past its deadline (`EngineArgs.request_timeout`) and was stopped."""


class DeviceOutOfMemoryError(GenerationError):
    """The device ran out of memory during the request; a smaller or later request may succeed."""


class WorkerLostError(GenerationError):
    """The model worker running the request went away (its process died); another worker may run it."""


class RequestCancelledError(Exception):
    """The request was cancelled before it finished."""


class QueueFullError(Exception):
    """The engine's queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):
        return type(self), (str(self), self.retry_after)


class EngineStoppedError(RuntimeError):
    """The engine has shut down."""
