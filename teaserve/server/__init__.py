"""The OpenAI-compatible HTTP server."""

from .app import build_app

__all__ = ["build_app"]
