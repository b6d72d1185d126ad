"""Cache profiles: a model's calibrated cache settings, written by `teaserve calibrate`, loaded with --cache-profile.

A profile is a JSON object whose "cache" section maps backend names to server settings, e.g.
`{"model": ..., "transformer": "QwenImageTransformer2DModel", "cache": {"tea_cache": {"coefficients": [...],
"x_range": [...], "quality_table": {...}}}}`. The engine layers a backend's section between the model folder's
own settings (teaserve.json "cache") and the user's --cache-config. A profile is a server setting (trusted: it
names a file), read with a size limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cache import CACHE_BACKENDS, cache_backend_names
from ..cache.base import read_json_file

MAX_PROFILE_BYTES = 4 << 20
"""Several backends' settings and quality tables fit in a small fraction of this."""
CACHE_SECTION = "cache"


@dataclass(frozen=True)
class CacheProfile:
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Server settings by backend name."""
    transformer: str | None = None
    """The class name of the transformer the profile was calibrated on, when it says."""
    source: str = "cache profile"

    @classmethod
    def read(cls, path: str | Path) -> CacheProfile:
        what = f"cache profile {str(path)!r}"
        return cls.parse(read_json_file(path, what, MAX_PROFILE_BYTES), what)

    @classmethod
    def parse(cls, profile: Any, what: str = "cache profile") -> CacheProfile:
        """From a profile's JSON value; the settings themselves are checked when a backend is built on them."""
        if not isinstance(profile, dict) or not isinstance(profile.get(CACHE_SECTION), dict):
            raise ValueError(
                f'{what} has no "{CACHE_SECTION}" object of settings by backend (write it with teaserve calibrate; '
                "an older TeaCache profile loads with --cache-config '{\"coefficients_file\": PATH}')"
            )
        section = profile[CACHE_SECTION]
        unknown = sorted(str(name)[:40] for name in section if name not in CACHE_BACKENDS)
        if unknown:
            valid = ", ".join(cache_backend_names())
            raise ValueError(f"{what} names unknown cache backend(s) {unknown}; valid: {valid}")
        for name, settings in section.items():
            if not isinstance(settings, dict):
                raise ValueError(f"{what}: the settings of {name} must be a JSON object")
        transformer = profile.get("transformer")
        if transformer is not None and not isinstance(transformer, str):
            raise ValueError(f'{what}: "transformer" must be the class name of the transformer it was calibrated on')
        return cls({name: dict(settings) for name, settings in section.items()}, transformer, what)

    def check_transformer(self, transformer: object) -> None:
        """Refuse a profile calibrated on another kind of transformer: its numbers describe another model."""
        name = type(transformer).__name__
        if self.transformer is not None and self.transformer != name:
            raise ValueError(
                f"{self.source} was calibrated on a {self.transformer}, this model's transformer is {name}"
            )
