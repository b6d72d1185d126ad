"""teaserve: an OpenAI-compatible server and Python library for diffusion models with step caching."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Omni", "OmniDiffusionSamplingParams", "__version__"]

if TYPE_CHECKING:
    from .engine import Omni, OmniDiffusionSamplingParams


def __getattr__(name: str) -> Any:
    # The engine (and with it torch, diffusers and every model family) loads on first use, so that importing a
    # light sub-package such as teaserve.cache does not load it.
    if name in ("Omni", "OmniDiffusionSamplingParams"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
