"""The names a request may call the served model by."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import OpenAIError


def check_model_name(requested: str | None, names: Sequence[str]) -> None:
    """404 model_not_found unless `requested` is omitted or one of `names` (the first: the served name)."""
    if requested is not None and requested not in names:
        raise OpenAIError(
            404,
            f"The model `{requested}` does not exist; this server serves `{names[0]}`",
            param="model",
            code="model_not_found",
        )
