"""Resolve a model name (local folder, hub id, or nothing for the embedded default) and load it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .base import GenerationDefaults, ModelFamily
from .registry import get_family, supported_architectures

logger = logging.getLogger(__name__)

MODEL_PROFILE_FILE = "teaserve.json"
"""Optional file in a model folder: served name, default overrides and recommended cache settings."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *_DTYPES)


@dataclass
class LoadedModel:
    """A pipeline ready to run, with everything the engine needs to know about it."""

    name: str
    source: str
    architecture: str
    family: ModelFamily
    pipeline: Any
    device: torch.device
    dtype: torch.dtype
    defaults: GenerationDefaults
    cache_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Recommended settings of cache backends on this model, by backend name."""
    default_cache_backend: str | None = None
    """The backend the model runs with when neither the user nor $DIFFUSION_CACHE_BACKEND chooses one."""
    knob_defaults: dict[str, Any] = field(default_factory=dict)
    """The model folder's own defaults of the family's model-only parameters (over the family's)."""

    @property
    def size_multiple(self) -> int:
        return self.family.size_multiple(self.pipeline)

    @property
    def default_size(self) -> tuple[int, int]:
        width, height = self.family.default_size(self.pipeline)
        return self.defaults.width or width, self.defaults.height or height


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"invalid device {device!r}: {error}; valid examples: auto, cpu, cuda, cuda:1") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"invalid dtype {dtype!r}; valid choices: {', '.join(DTYPE_CHOICES)}") from None


def read_architecture(folder: Path) -> str:
    """A model folder's architecture: model_index.json's `_class_name`, else the family that knows its layout."""
    index = folder / "model_index.json"
    if index.is_file():
        return json.loads(index.read_text())["_class_name"]
    for architecture in supported_architectures():
        if get_family(architecture).matches_folder(folder):
            return architecture
    raise ValueError(
        f"{folder} is not a model folder teaserve knows: it has no model_index.json and matches no published layout "
        f"of {', '.join(supported_architectures())}"
    )


def embedded_models() -> dict[str, Path]:
    """The models shipped inside the package, by the name they are served under (no download)."""
    from . import default_model, default_video_model

    return {
        default_model.SERVED_MODEL_NAME: default_model.default_model_path(),
        default_video_model.SERVED_MODEL_NAME: default_video_model.default_video_model_path(),
    }


def _local_folder(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    embedded = embedded_models().get(model)
    if embedded is not None:
        return embedded
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r} is neither a model folder nor a Hugging Face Hub id (owner/name)")
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        try:
            hf_hub_download(model, "model_index.json")
        except EntryNotFoundError:  # published without a diffusers index (BAGEL): take the whole repository
            return Path(snapshot_download(model))
        return Path(DiffusionPipeline.download(model))
    except Exception as error:  # the hub client raises many types: offline, not found, gated...
        raise ValueError(f"could not fetch model {model!r} from the Hugging Face Hub: {error}") from error


def write_profile(folder: str | Path, **profile) -> None:
    """Write a model folder's teaserve.json: served_model_name, defaults (GenerationDefaults fields and the
    family's model-only parameters), cache."""
    (Path(folder) / MODEL_PROFILE_FILE).write_text(json.dumps(profile, indent=2) + "\n")


def _read_profile(folder: Path) -> dict[str, Any]:
    path = folder / MODEL_PROFILE_FILE
    if not path.is_file():
        return {}
    profile = json.loads(path.read_text())
    valid = ("served_model_name", "defaults", "cache_backend", "cache")
    unknown = set(profile) - set(valid)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; valid keys: {', '.join(valid)}")
    return profile


def load_model(
    model: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load `model`: a diffusers folder, a hub id, or None for the embedded default model."""
    if model is None:
        from .default_model import default_model_path

        folder = default_model_path()
    else:
        folder = _local_folder(str(model))
    family = get_family(read_architecture(folder))
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    profile = _read_profile(folder)
    defaults, knob_defaults = family.profile_defaults({**family.folder_defaults(folder), **profile.get("defaults", {})})
    logger.info("loading %s (%s) on %s as %s", folder, family.architecture, resolved_device, resolved_dtype)
    pipeline = family.load(folder, resolved_device, resolved_dtype)
    pipeline.set_progress_bar_config(disable=True)
    return LoadedModel(
        name=profile.get("served_model_name") or (str(model) if model is not None else folder.name),
        source=str(folder),
        architecture=family.architecture,
        family=family,
        pipeline=pipeline,
        device=resolved_device,
        dtype=resolved_dtype,
        defaults=defaults,
        cache_defaults=profile.get("cache", {}),
        default_cache_backend=profile.get("cache_backend"),
        knob_defaults=knob_defaults,
    )
