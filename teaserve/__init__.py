"""teaserve: an OpenAI-compatible server and Python library for diffusion models with step caching."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .cache import TeaCacheConfig, apply_teacache, remove_teacache
    from .engine import Omni, OmniDiffusionSamplingParams

# Public names, imported on first use so that `import teaserve.cache` (or the CLI's --help) loads only what it needs.
_LAZY = {
    "Omni": "teaserve.engine",
    "OmniDiffusionSamplingParams": "teaserve.engine",
    "TeaCacheConfig": "teaserve.cache",
    "apply_teacache": "teaserve.cache",
    "remove_teacache": "teaserve.cache",
}

__all__ = ["Omni", "OmniDiffusionSamplingParams", "TeaCacheConfig", "__version__", "apply_teacache", "remove_teacache"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'teaserve' has no attribute {name!r}")
    importlib.import_module("teaserve.pipelines")  # the model families register their cache targets on import
    return getattr(importlib.import_module(_LAZY[name]), name)
