"""Model families (keyed by diffusers architecture name), loading, tiny offline builders, the default model."""

from . import bagel, cogvideox, flux, qwen_image, wan  # noqa: F401  (importing a family module registers it)
from .base import (
    VIDEO_TASKS,
    GenerationDefaults,
    KnobValueError,
    ModelFamily,
    ModelKnobs,
    PipelineInputs,
    TextEmbedding,
    VideoKnobs,
)
from .loading import DTYPE_CHOICES, LoadedModel, load_model, resolve_device, resolve_dtype
from .registry import (
    architectures_with_knob,
    editing_architectures,
    get_family,
    register_family,
    supported_architectures,
)

__all__ = [
    "DTYPE_CHOICES",
    "VIDEO_TASKS",
    "GenerationDefaults",
    "KnobValueError",
    "LoadedModel",
    "ModelFamily",
    "ModelKnobs",
    "PipelineInputs",
    "TextEmbedding",
    "VideoKnobs",
    "architectures_with_knob",
    "editing_architectures",
    "get_family",
    "load_model",
    "register_family",
    "resolve_device",
    "resolve_dtype",
    "supported_architectures",
]
