"""BAGEL (ByteDance-Seed/BAGEL-7B-MoT): image generation and editing with a MoT language model as the denoiser."""

from . import family  # noqa: F401  (registers the BAGEL family)
