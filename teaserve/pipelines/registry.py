"""The model registry: architecture name (model_index.json `_class_name`) -> model family."""

from __future__ import annotations

from .base import ModelFamily

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.architecture in _FAMILIES:
        raise ValueError(f"architecture {family.architecture!r} is already registered")
    _FAMILIES[family.architecture] = family
    return family


def supported_architectures() -> list[str]:
    return sorted(_FAMILIES)


def editing_architectures() -> list[str]:
    """The image-edit models (image-to-video models take an input image too, but make videos)."""
    return sorted(name for name, family in _FAMILIES.items() if family.can_edit and not family.makes_video)


def get_family(architecture: str) -> ModelFamily:
    try:
        return _FAMILIES[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported architectures: "
            + ", ".join(supported_architectures())
        ) from None


def architectures_with_knob(name: str) -> list[str]:
    """The architectures whose families take the model-only request parameter `name`."""
    return sorted(
        architecture
        for architecture, family in _FAMILIES.items()
        if family.knobs is not None and name in family.knobs.model_fields
    )
