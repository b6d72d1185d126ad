"""MagCache: diffusers' MagCacheConfig on the block stack of the transformer's cache target, and its calibration.

MagCache (arXiv 2506.09045) skips the block stack on the strength of a per-model curve, the magnitude ratios: at
step t, the mean over tokens of ||r_t|| / ||r_(t-1)||, where r is the stack's residual (last block output minus
first block input). After the first `retention_ratio` of the steps it multiplies the ratios of the steps since
the last computed one; while the accumulated |1 - product| stays at most `threshold` and at most
`max_skip_steps` steps in a row were skipped, a step adds the last computed residual instead of running the
stack. Each CFG branch keeps its own state.

diffusers counts steps itself and interpolates the ratios to its configured step count, so the hooks are
re-applied whenever a request's step count differs from the last one's. The ratios come from the server settings
(`mag_ratios`, e.g. a profile written by `teaserve calibrate --backend mag_cache`, which records them with
`MagRatioCalibrator`), else from the transformer's cache target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, MagCacheConfig, ModelHook, apply_mag_cache
from diffusers.hooks.hooks import BaseState, StateManager

from .base import Calibrator, is_number, parse_config, short_repr
from .targets import ArgumentsHook, BlockIO, CacheTarget, CallOrderBranches, DiffusersCacheBackend, cache_target_for

NAME = "mag_cache"
MAX_THRESHOLD = 1e9
MAX_SKIP_STEPS = 10_000
MAX_RATIOS = 10_000
"""Longest magnitude-ratio curve (one value per step)."""
MAX_RATIO = 1e3
HEAD_HOOK = "teaserve_mag_ratio_head"
TAIL_HOOK = "teaserve_mag_ratio_tail"
BRANCH_HOOK = "teaserve_mag_ratio_branches"


def check_threshold(value: Any) -> float:
    # Comparisons (not float()) so that 10**400 and NaN are refused instead of overflowing or slipping through.
    if not is_number(value) or not 0 <= value <= MAX_THRESHOLD:
        raise ValueError(f"threshold must be a number in [0, {MAX_THRESHOLD:g}], got {short_repr(value)}")
    return float(value)


def check_max_skip_steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SKIP_STEPS:
        raise ValueError(
            f"max_skip_steps must be an integer in [0, {MAX_SKIP_STEPS}] (0 never skips), got {short_repr(value)}"
        )
    return value


def check_retention_ratio(value: Any) -> float:
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"retention_ratio must be a number in [0, 1], got {short_repr(value)}")
    return float(value)


def check_mag_ratios(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not 0 < len(value) <= MAX_RATIOS:
        raise ValueError(
            f"mag_ratios must be a list of 1 to {MAX_RATIOS} numbers, one per step (write them with "
            f"`teaserve calibrate --backend {NAME}`), got {short_repr(value)}"
        )
    if not all(is_number(ratio) and 0 < ratio <= MAX_RATIO for ratio in value):
        raise ValueError(f"mag_ratios must be numbers in (0, {MAX_RATIO:g}]")
    return tuple(float(ratio) for ratio in value)


@dataclass(frozen=True)
class MagCacheSettings:
    """threshold: largest accumulated error at which a step is skipped (larger = faster).
    max_skip_steps: most steps skipped in a row (0 never skips).
    retention_ratio: the fraction of the steps, from the first, that are always computed.
    mag_ratios: the magnitude ratio of each step (the first is 1.0), at any step count; None = the transformer's
        cache target's."""

    threshold: float = MagCacheConfig.threshold
    max_skip_steps: int = MagCacheConfig.max_skip_steps
    retention_ratio: float = MagCacheConfig.retention_ratio
    mag_ratios: Sequence[float] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        check_max_skip_steps(self.max_skip_steps)
        object.__setattr__(self, "retention_ratio", check_retention_ratio(self.retention_ratio))
        if self.mag_ratios is not None:
            object.__setattr__(self, "mag_ratios", check_mag_ratios(self.mag_ratios))


def target_ratios(settings: MagCacheSettings, target: CacheTarget, transformer: torch.nn.Module) -> tuple[float, ...]:
    """The settings' ratios, else the ones the transformer's target recommends."""
    if settings.mag_ratios is not None:
        return tuple(settings.mag_ratios)
    recommended = target.recommended(transformer, NAME)
    if "mag_ratios" not in recommended:
        raise ValueError(
            f"{NAME} has no magnitude ratios for transformer {type(transformer).__name__}: record them with "
            f"`teaserve calibrate --backend {NAME}` and start the server with its profile (or pass mag_ratios)"
        )
    return check_mag_ratios(recommended["mag_ratios"])


class MagCacheBackend(DiffusersCacheBackend):
    """`mag_cache`: server settings are MagCacheSettings' fields; a request may set `enabled`, `threshold` and
    `max_skip_steps`."""

    name = NAME
    request_keys = ("enabled", "threshold", "max_skip_steps")
    request_checks = {"threshold": check_threshold, "max_skip_steps": check_max_skip_steps}
    tuning_key = "threshold"
    tuning_values = (0.06, 0.12, 0.24, 0.5, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.config = MagCacheSettings()
        self._applied_to: tuple[CacheTarget, torch.nn.Module] | None = None
        self._ratios: tuple[float, ...] = ()

    @classmethod
    def calibrator(cls) -> MagRatioCalibrator:
        return MagRatioCalibrator()

    def configure_method(self, settings) -> None:
        config = parse_config(MagCacheSettings, settings, what=NAME)
        if self._applied_to is not None:
            self._ratios = target_ratios(config, *self._applied_to)
        self.config = config

    def check_transformer(self, transformer, target) -> None:
        self._ratios = target_ratios(self.config, target, transformer)
        self._applied_to = (target, transformer)

    def remove(self, pipeline) -> None:
        super().remove(pipeline)
        self._applied_to = None

    def request_settings(self, num_steps, overrides) -> dict[str, Any]:
        return {
            "threshold": float(overrides.get("threshold", self.config.threshold)),
            "max_skip_steps": int(overrides.get("max_skip_steps", self.config.max_skip_steps)),
            "retention_ratio": self.config.retention_ratio,
            "num_inference_steps": num_steps,
            "mag_ratios": self._ratios,
        }

    def diffusers_cache(self, settings):
        # diffusers interpolates the ratios to `num_inference_steps`, the count its hooks step through.
        return apply_mag_cache, MagCacheConfig(**{**settings, "mag_ratios": list(settings["mag_ratios"])})


# -- calibration -------------------------------------------------------------------------------------------------
class _BranchResiduals(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.stack_input: torch.Tensor | None = None
        self.previous_residual: torch.Tensor | None = None


class _StackInput(ArgumentsHook):
    """First block: keeps the hidden states entering the stack."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, io: BlockIO):
        super().__init__()
        self.state_manager, self.io = state_manager, io

    def pre_forward(self, module, *args, **kwargs):
        state: _BranchResiduals = self.state_manager.get_state()
        state.stack_input = self.io.inputs(self.arguments(args, kwargs))[0].detach()
        return args, kwargs

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class _ResidualRatio(ModelHook):
    """Last block: the magnitude ratio of the stack's residual to the branch's previous one."""

    def __init__(self, state_manager: StateManager, io: BlockIO, ratios: dict[str, list[float]]):
        super().__init__()
        self.state_manager, self.io, self.ratios = state_manager, io, ratios

    def post_forward(self, module, output):
        state: _BranchResiduals = self.state_manager.get_state()
        assert state.stack_input is not None, "the first block ran before the last"
        hidden = self.io.split(output)[0].detach()
        # A last block that returns text and image tokens fused has the image tokens (the stack's input) at the end.
        residual = (hidden[:, -state.stack_input.shape[1] :] - state.stack_input).float()
        ratio = 1.0
        if state.previous_residual is not None:
            norms = torch.linalg.vector_norm(residual, dim=-1)
            previous = torch.linalg.vector_norm(state.previous_residual, dim=-1)
            ratio = float((norms / (previous + 1e-8)).mean())
        state.previous_residual = residual
        self.ratios.setdefault(self.state_manager.context.name, []).append(ratio)
        return output


class MagRatioCalibrator(Calibrator):
    """Records MagCache's magnitude ratios of uncached requests, per CFG branch and step, and fits the curve.

    The ratio at step t is the mean over tokens of ||r_t|| / ||r_(t-1)||, r = last block output - first block
    input of the transformer's cache target, exactly as MagCache defines it (1.0 at a branch's first step).
    `fit()` averages the curves of the largest step count over prompts and branches: diffusers interpolates
    them to any other count.
    """

    def __init__(self) -> None:
        self.curves: dict[int, list[list[float]]] = {}
        """Recorded curves by step count (one per request and branch)."""
        self._ratios: dict[str, list[float]] = {}
        self._transformer: torch.nn.Module | None = None
        self._state_manager = StateManager(_BranchResiduals)

    def attach(self, transformer) -> None:
        if self._transformer is not None:
            raise ValueError("the calibrator is already attached; detach() it first")
        target = cache_target_for(transformer)
        blocks = target.block_stack(transformer)
        state_manager = self._state_manager
        # With one block, the input hook (registered last) runs first.
        tail = _ResidualRatio(state_manager, BlockIO.of(blocks[-1]), self._ratios)
        HookRegistry.check_if_exists_or_initialize(blocks[-1]).register_hook(tail, TAIL_HOOK)
        head = _StackInput(state_manager, BlockIO.of(blocks[0]))
        HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(head, HEAD_HOOK)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(CallOrderBranches(state_manager, target), BRANCH_HOOK)
        registry.invalidate_child_registries_cache()
        self._transformer = transformer
        self._ratios.clear()

    def detach(self) -> None:
        if self._transformer is None:
            return
        registry = HookRegistry.check_if_exists_or_initialize(self._transformer)
        for name in (BRANCH_HOOK, HEAD_HOOK, TAIL_HOOK):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
        self._transformer = None

    def end_request(self, num_steps: int) -> None:
        self.curves.setdefault(num_steps, []).extend(self._ratios.values())
        self._ratios.clear()
        self._state_manager.reset()  # the next request starts afresh even if this one raised

    def fit(self) -> dict[str, Any]:
        if not self.curves:
            raise ValueError(f"no {NAME} magnitude ratios were recorded: run requests between attach() and detach()")
        num_steps = max(self.curves)
        curves = self.curves[num_steps]
        ratios = [1.0]
        # A branch guided on the first steps only (BAGEL's CFG interval) counts where it ran.
        for step in range(1, num_steps):
            values = [curve[step] for curve in curves if len(curve) > step]
            if not values:
                raise ValueError(f"no branch of the {num_steps}-step requests ran step {step}")
            ratios.append(float(np.mean(values)))
        return {"mag_ratios": ratios}
