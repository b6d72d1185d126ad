"""The engine: sampling params, engine settings and limits, request/output types, the single model worker,
AsyncEngine and Omni."""

from .args import DEFAULT_MAX_QUEUE_SIZE, EngineArgs
from .async_engine import AsyncEngine, RequestHandle
from .cache_profile import CacheProfile
from .errors import (
    DeviceOutOfMemoryError,
    EngineStoppedError,
    GenerationError,
    InvalidImageError,
    InvalidParameterError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
)
from .images import ImageSource
from .omni import Omni
from .params import MAX_OUTPUTS, MAX_STEPS, OmniDiffusionSamplingParams, SamplingFields
from .prompt_cache import PromptEmbeddingCache
from .request import GenerationRequest, ProgressEvent, PromptInput, RequestMetrics, RequestOutput
from .video import GeneratedVideo, decode_mp4

__all__ = [
    "DEFAULT_MAX_QUEUE_SIZE",
    "MAX_OUTPUTS",
    "MAX_STEPS",
    "AsyncEngine",
    "CacheProfile",
    "DeviceOutOfMemoryError",
    "EngineArgs",
    "EngineStoppedError",
    "GeneratedVideo",
    "GenerationError",
    "GenerationRequest",
    "ImageSource",
    "InvalidImageError",
    "InvalidParameterError",
    "Omni",
    "OmniDiffusionSamplingParams",
    "ProgressEvent",
    "PromptEmbeddingCache",
    "PromptInput",
    "QueueFullError",
    "RequestCancelledError",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "RequestTimeoutError",
    "SamplingFields",
    "decode_mp4",
]
