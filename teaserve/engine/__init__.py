"""The engine: sampling params, engine settings and limits, request/output types, the single model worker,
AsyncEngine and Omni, and the interface a server needs of an engine (EngineClient)."""

from .args import DEFAULT_MAX_QUEUE_SIZE, EngineArgs
from .async_engine import AsyncEngine, LocalGeneration, RequestHandle
from .cache_profile import CacheProfile
from .client import CacheCounts, EngineClient, Generation, ServedCache, ServedModel
from .errors import (
    DeviceOutOfMemoryError,
    EngineStoppedError,
    GenerationError,
    InvalidImageError,
    InvalidParameterError,
    QueueFullError,
    RequestCancelledError,
    RequestTimeoutError,
    WorkerLostError,
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
    "CacheCounts",
    "CacheProfile",
    "DeviceOutOfMemoryError",
    "EngineArgs",
    "EngineClient",
    "EngineStoppedError",
    "GeneratedVideo",
    "Generation",
    "GenerationError",
    "GenerationRequest",
    "ImageSource",
    "InvalidImageError",
    "InvalidParameterError",
    "LocalGeneration",
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
    "ServedCache",
    "ServedModel",
    "WorkerLostError",
    "decode_mp4",
]
