"""A second cache backend for the evaluation tests, with a calibrator: it skips nothing but scales the transformer's
output by 1 + scale, so a larger tuning value gives a worse image (and scale 0 the uncached one)."""

from __future__ import annotations

from typing import Any

from teaserve.cache import CacheBackend, CacheSettingsError
from teaserve.cache.base import Calibrator, is_number


def _scaled(output, scale: float):
    return (output[0] * (1 + scale), *output[1:])


class CallCounter(Calibrator):
    """Fits the transformer calls of every uncached request it saw, by step count."""

    def __init__(self) -> None:
        self.calls = 0
        self.by_steps: dict[str, list[int]] = {}
        self.handle = None

    def attach(self, transformer) -> None:
        self.handle = transformer.register_forward_pre_hook(lambda module, args: self._count())

    def _count(self) -> None:
        self.calls += 1

    def detach(self) -> None:
        self.handle.remove()

    def end_request(self, num_steps: int) -> None:
        self.by_steps.setdefault(str(num_steps), []).append(self.calls)
        self.calls = 0

    def fit(self) -> dict[str, Any]:
        return {"recorded_calls": self.by_steps}


class ScaledOutput(CacheBackend):
    name = "scaled_output"
    request_keys = ("enabled", "scale")
    tuning_key = "scale"
    tuning_values = (0.0, 0.02, 0.04)

    def __init__(self) -> None:
        super().__init__()
        self.scale = self.current = 0.0
        self.recorded_calls: dict[str, list[int]] | None = None
        self.enabled, self.calls, self.num_steps, self.handle = True, 0, 0, None

    def configure_method(self, settings: dict[str, Any]) -> None:
        unknown = sorted(set(settings) - {"scale", "recorded_calls"})
        if unknown:
            raise ValueError(f"unknown scaled_output setting(s) {unknown}; valid keys: scale, recorded_calls")
        self.scale = settings.get("scale", 0.0)
        self.recorded_calls = settings.get("recorded_calls")

    def apply(self, pipeline) -> None:
        self.handle = pipeline.transformer.register_forward_hook(self._scale)

    def _scale(self, module, args, output):
        self.calls += 1
        return _scaled(output, self.current)

    def remove(self, pipeline) -> None:
        self.handle.remove()

    def check_method_overrides(self, overrides: dict[str, Any]) -> None:
        scale = overrides.get("scale", 0.0)
        if not is_number(scale) or not 0 <= scale <= 1:
            raise CacheSettingsError(f"cache_config: scale must be a number in [0, 1], got {scale!r}")

    def start_request(self, num_steps: int, overrides: dict[str, Any]) -> None:
        self.enabled = overrides.get("enabled", True)
        self.current = overrides.get("scale", self.scale) if self.enabled else 0.0
        self.calls, self.num_steps = 0, num_steps

    def request_stats(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "enabled": self.enabled,
            "num_steps": self.num_steps,
            "computed_steps": self.calls,
            "skipped_steps": 0,
            "scale": self.current,
            "branches": {},
        }

    @classmethod
    def calibrator(cls) -> Calibrator:
        return CallCounter()
