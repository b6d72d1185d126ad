"""The engine: sampling params, request/output types, the single model worker, AsyncEngine and Omni."""

from .async_engine import DEFAULT_MAX_QUEUE_SIZE, AsyncEngine, RequestHandle
from .images import InvalidImageError, open_image
from .omni import Omni
from .params import MAX_OUTPUTS, MAX_PIXELS, MAX_STEPS, OmniDiffusionSamplingParams
from .request import (
    DeviceOutOfMemoryError,
    EngineStoppedError,
    GenerationError,
    GenerationRequest,
    ProgressEvent,
    PromptInput,
    QueueFullError,
    RequestCancelledError,
    RequestMetrics,
    RequestOutput,
    RequestTimeoutError,
)

__all__ = [
    "DEFAULT_MAX_QUEUE_SIZE",
    "MAX_OUTPUTS",
    "MAX_PIXELS",
    "MAX_STEPS",
    "AsyncEngine",
    "DeviceOutOfMemoryError",
    "EngineStoppedError",
    "GenerationError",
    "GenerationRequest",
    "InvalidImageError",
    "Omni",
    "OmniDiffusionSamplingParams",
    "ProgressEvent",
    "PromptInput",
    "QueueFullError",
    "RequestCancelledError",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "RequestTimeoutError",
    "open_image",
]
