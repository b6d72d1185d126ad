"""teaserve: an OpenAI-compatible server and Python library for diffusion models with step caching."""

__version__ = "0.1.0"

from .engine import Omni, OmniDiffusionSamplingParams

__all__ = ["Omni", "OmniDiffusionSamplingParams", "__version__"]
