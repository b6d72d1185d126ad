"""TeaCache on diffusers' hook machinery.

TeaCache ("Timestep Embedding Tells: It's Time to Cache", arXiv 2411.19108) watches how much the
timestep-modulated input of the first transformer block changes from step to step. It rescales that relative
L1 change with a per-model polynomial, accumulates it, and while the sum stays below `rel_l1_thresh` it skips
the whole block stack, adding the residual (stack output minus stack input) of the last computed step instead.

Three hooks carry it out, as in diffusers' own caches: the head hook on the first block computes the gate
signal and decides; middle hooks pass their inputs through on a skipped step; the tail hook on the last block
stores the residual. Each `cache_context` ("cond", "uncond", ...) under which the pipeline calls the
transformer gets its own state through diffusers' StateManager, so CFG branches never mix. The step index and
the step count come from the engine (`begin_request`, `set_step`), never from counting forwards.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, StateManager

from .base import CacheBackend, parse_config

HEAD_HOOK = "teaserve_teacache_head"
BLOCK_HOOK = "teaserve_teacache_block"

Gate = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor]


# -- configuration -----------------------------------------------------------------------------------------
def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache settings.

    rel_l1_thresh: skip while the accumulated rescaled change stays below this (> 0; larger = faster).
    coefficients: the rescaling polynomial, 5 numbers, highest power first; None = the model's built-in ones.
    coefficients_file: a profile written by `teaserve calibrate` to take the coefficients from (instead of
        `coefficients`).
    max_consecutive_skips: computed at least every this many + 1 steps; None = unlimited (the original rule).
    """

    rel_l1_thresh: float = 0.2
    coefficients: tuple[float, ...] | None = None
    coefficients_file: str | None = None
    max_consecutive_skips: int | None = None

    def __post_init__(self) -> None:
        thresh = self.rel_l1_thresh
        if not _is_finite_number(thresh) or thresh <= 0:
            raise ValueError(f"rel_l1_thresh must be a number > 0, got {thresh!r}")
        if self.coefficients_file is not None:
            if self.coefficients is not None:
                raise ValueError("give coefficients or coefficients_file, not both")
            object.__setattr__(self, "coefficients", read_coefficients_file(self.coefficients_file))
        if self.coefficients is not None:
            coefficients = self.coefficients
            if not isinstance(coefficients, list | tuple) or len(coefficients) != 5:
                raise ValueError(f"coefficients must be a list of 5 numbers, highest power first, got {coefficients!r}")
            if not all(
                isinstance(c, int | float) and not isinstance(c, bool) and math.isfinite(c) for c in coefficients
            ):
                raise ValueError(f"coefficients must be finite numbers, got {coefficients!r}")
            object.__setattr__(self, "coefficients", tuple(float(c) for c in coefficients))
        skips = self.max_consecutive_skips
        if skips is not None and (isinstance(skips, bool) or not isinstance(skips, int) or skips < 1):
            raise ValueError(f"max_consecutive_skips must be an integer >= 1 (or null for unlimited), got {skips!r}")


OVERRIDE_KEYS = ("enabled", *(f.name for f in dataclasses.fields(TeaCacheConfig)))
COEFFICIENT_KEYS = ("coefficients", "coefficients_file")


def read_coefficients_file(path: str | Path) -> list[float]:
    """The coefficients of a calibration profile (JSON with a "coefficients" list)."""
    try:
        profile = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read coefficients_file {str(path)!r}: {error}") from None
    if not isinstance(profile, dict) or "coefficients" not in profile:
        raise ValueError(
            f'coefficients_file {str(path)!r} has no "coefficients" list (write it with teaserve calibrate)'
        )
    return profile["coefficients"]


def layered_settings(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later settings over earlier ones; `coefficients` and `coefficients_file` replace each other as one setting."""
    merged: dict[str, Any] = {}
    for layer in layers:
        layer = layer or {}
        if any(key in layer for key in COEFFICIENT_KEYS):
            for key in COEFFICIENT_KEYS:
                merged.pop(key, None)
        merged.update(layer)
    return merged


# -- per-transformer knowledge -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeaCacheModel:
    """What TeaCache needs to know about one transformer class: its block stack, gate and coefficients."""

    blocks: Callable[[torch.nn.Module], list[torch.nn.Module]]
    gate: Gate
    """The timestep-modulated input of the first block, from that block's (bound) call arguments."""
    coefficients: tuple[float, ...]


def qwen_image_gate(block: torch.nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
    # The first modulation of QwenImageTransformerBlock: img_norm1(x) * (1 + scale) + shift, through the block's
    # own `_modulate` so that per-token modulation (zero_cond_t, Edit-2511) is honoured.
    first_modulation = block.img_mod(arguments["temb"]).chunk(2, dim=-1)[0]
    modulated, _ = block._modulate(
        block.img_norm1(arguments["hidden_states"]), first_modulation, arguments.get("modulate_index")
    )
    return modulated


def flux_gate(block: torch.nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
    # The first double-stream block's AdaLayerNormZero output: norm(x) * (1 + scale_msa) + shift_msa.
    return block.norm1(arguments["hidden_states"], emb=arguments["temb"])[0]


QWEN_IMAGE_COEFFICIENTS = (-450.0, 280.0, -45.0, 3.2, -0.02)
FLUX_COEFFICIENTS = (498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861)


def bagel_gate(block: torch.nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
    # BAGEL has no adaLN: the flow time is added to the latent tokens, so the packed generation block entering
    # the first MoT layer (markers + latent tokens) is the timestep-dependent signal, as in vLLM-Omni.
    return arguments["hidden_states"]


BAGEL_COEFFICIENTS = (1.33313129e6, -1.68644226e5, 7.95050740e3, -1.63747873e2, 1.26352397)

TEACACHE_MODELS: dict[str, TeaCacheModel] = {
    "QwenImageTransformer2DModel": TeaCacheModel(
        blocks=lambda transformer: list(transformer.transformer_blocks),
        gate=qwen_image_gate,
        coefficients=QWEN_IMAGE_COEFFICIENTS,
    ),
    # Flux runs its double-stream blocks, then its single-stream ones; both take and return
    # (encoder_hidden_states, hidden_states), so the stack spans both lists.
    "FluxTransformer2DModel": TeaCacheModel(
        blocks=lambda transformer: [*transformer.transformer_blocks, *transformer.single_transformer_blocks],
        gate=flux_gate,
        coefficients=FLUX_COEFFICIENTS,
    ),
    "BagelModel": TeaCacheModel(
        blocks=lambda model: list(model.language_model.model.layers),
        gate=bagel_gate,
        coefficients=BAGEL_COEFFICIENTS,
    ),
}


def teacache_model_for(transformer: torch.nn.Module) -> TeaCacheModel:
    name = type(transformer).__name__
    try:
        return TEACACHE_MODELS[name]
    except KeyError:
        supported = ", ".join(sorted(TEACACHE_MODELS))
        raise ValueError(
            f"tea_cache does not support transformer {name}; supported transformers: {supported}"
        ) from None


# -- the decision rule ----------------------------------------------------------------------------------------
def rescale(coefficients: tuple[float, ...], rel_l1: float) -> float:
    """The polynomial (highest power first) at `rel_l1`, clamped at 0 so that the sum never decreases."""
    value = 0.0
    for coefficient in coefficients:
        value = value * rel_l1 + coefficient
    return max(0.0, value)


@dataclass
class BranchStats:
    """What happened to one CFG branch during one request."""

    computed_steps: int = 0
    skipped_steps: int = 0
    schedule: str = ""
    """One letter per step: C computed, S skipped."""
    rel_l1: list[float | None] = field(default_factory=list)
    """Relative L1 change of the gate signal at each step (None at the first)."""
    accumulated: list[float] = field(default_factory=list)
    """The accumulated rescaled change compared with the threshold at each step (0 where forced)."""
    output_rel_l1: list[float | None] = field(default_factory=list)
    """Relative L1 change of the block stack's output at each computed step, when recording for calibration."""


@dataclass
class TeaCachePolicy:
    """The TeaCache rule for one branch: first and last step computed, skip while the sum stays below thresh."""

    config: TeaCacheConfig
    coefficients: tuple[float, ...]
    accumulated: float = 0.0
    consecutive_skips: int = 0

    def should_compute(
        self, rel_l1: float | None, step_index: int, num_steps: int, stats: BranchStats, force: bool = False
    ) -> bool:
        forced = force or rel_l1 is None or step_index <= 0 or step_index >= num_steps - 1
        if forced:
            self.accumulated = 0.0
        else:
            self.accumulated += rescale(self.coefficients, rel_l1)
        limit = self.config.max_consecutive_skips
        skip = (
            not forced
            and self.accumulated < self.config.rel_l1_thresh
            and (limit is None or self.consecutive_skips < limit)
        )
        stats.rel_l1.append(rel_l1)
        stats.accumulated.append(self.accumulated)
        if skip:
            self.consecutive_skips += 1
            stats.skipped_steps += 1
            stats.schedule += "S"
        else:
            self.accumulated = 0.0
            self.consecutive_skips = 0
            stats.computed_steps += 1
            stats.schedule += "C"
        return not skip


# -- hooks ------------------------------------------------------------------------------------------------------
@dataclass
class RequestClock:
    """Shared by the backend and its hooks: where the current request is."""

    config: TeaCacheConfig
    coefficients: tuple[float, ...]
    enabled: bool = True
    num_steps: int = 0
    step_index: int = 0
    branches: dict[str, BranchStats] = field(default_factory=dict)
    record_outputs: bool = False
    """Calibration: also record how much the block stack's output changes from step to step."""


class BranchState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.policy: TeaCachePolicy | None = None
        self.previous_gate: torch.Tensor | None = None
        self.skipping = False
        self.head_inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.residuals: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.previous_output: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockIO:
    """Where a block's hidden states sit in its arguments and outputs (diffusers' block metadata)."""

    hidden_argument: str = "hidden_states"
    encoder_argument: str = "encoder_hidden_states"
    hidden_index: int | None = None
    encoder_index: int | None = None

    @classmethod
    def of(cls, block: torch.nn.Module) -> BlockIO:
        metadata = TransformerBlockRegistry.get(type(block))
        return cls(
            hidden_argument=metadata.hidden_states_argument_name,
            encoder_argument=metadata.encoder_hidden_states_argument_name,
            hidden_index=metadata.return_hidden_states_index,
            encoder_index=metadata.return_encoder_hidden_states_index,
        )

    def inputs(self, arguments: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoder = arguments.get(self.encoder_argument) if self.encoder_index is not None else None
        return arguments[self.hidden_argument], encoder

    def split(self, output) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(output, tuple):
            return output, None
        encoder = output[self.encoder_index] if self.encoder_index is not None else None
        return output[self.hidden_index], encoder

    def join(self, hidden: torch.Tensor, encoder: torch.Tensor | None):
        if self.hidden_index is None:
            return hidden
        output: list[torch.Tensor | None] = [None] * (1 + (self.encoder_index is not None))
        output[self.hidden_index] = hidden
        if self.encoder_index is not None:
            output[self.encoder_index] = encoder
        return tuple(output)


def _arguments(signature: inspect.Signature, args, kwargs) -> dict[str, Any]:
    # Transformers call their blocks with keyword arguments; binding the signature (slow) is the fallback.
    if not args:
        return kwargs
    return signature.bind_partial(None, *args, **kwargs).arguments


class TeaCacheBlockHook(ModelHook):
    """Middle and tail blocks: pass inputs through while skipping; the tail stores the residual."""

    def __init__(self, state_manager: StateManager, clock: RequestClock, io: BlockIO, is_tail: bool):
        super().__init__()
        self.state_manager, self.clock, self.io, self.is_tail = state_manager, clock, io, is_tail
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module):
        self._signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module, *args, **kwargs):
        if not self.clock.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        state: BranchState = self.state_manager.get_state()
        if state.skipping:
            return self.io.join(*self.io.inputs(_arguments(self._signature, args, kwargs)))
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            self._store_residuals(state, output)
        return output

    def _store_residuals(self, state: BranchState, output) -> None:
        hidden, encoder = self.io.split(output)
        head_hidden, head_encoder = state.head_inputs
        state.residuals = (
            hidden - head_hidden,
            None if encoder is None or head_encoder is None else encoder - head_encoder,
        )
        if self.clock.record_outputs:
            stats = self.clock.branches[self.state_manager.context.name]
            previous = state.previous_output
            rel_l1 = None if previous is None or previous.shape != hidden.shape else _relative_l1(hidden, previous)
            stats.output_rel_l1.append(rel_l1)
            state.previous_output = hidden.detach()


class TeaCacheHeadHook(TeaCacheBlockHook):
    """First block: compute the gate signal, decide, and on a skip return inputs plus the cached residual."""

    _is_stateful = True

    def __init__(self, state_manager, clock, io, is_tail, gate: Gate):
        super().__init__(state_manager, clock, io, is_tail)
        self.gate = gate

    def new_forward(self, module, *args, **kwargs):
        clock = self.clock
        if not clock.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        arguments = _arguments(self._signature, args, kwargs)
        state: BranchState = self.state_manager.get_state()
        branch = self.state_manager.context.name
        stats = clock.branches.setdefault(branch, BranchStats())
        if state.policy is None:
            state.policy = TeaCachePolicy(clock.config, clock.coefficients)

        gate = self.gate(module, arguments).detach()
        rel_l1 = None
        if state.previous_gate is not None and state.previous_gate.shape == gate.shape and state.residuals is not None:
            rel_l1 = _relative_l1(gate, state.previous_gate)
        state.previous_gate = gate
        compute = state.policy.should_compute(
            rel_l1, clock.step_index, clock.num_steps, stats, force=clock.record_outputs
        )

        hidden, encoder = self.io.inputs(arguments)
        state.skipping = not compute
        if not compute:
            hidden_residual, encoder_residual = state.residuals
            if encoder is not None and encoder_residual is not None:
                encoder = encoder + encoder_residual
            return self.io.join(hidden + hidden_residual, encoder)
        state.head_inputs = (hidden, encoder)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.is_tail:
            self._store_residuals(state, output)
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


@torch.compiler.disable
def _relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    previous = previous.float()
    change = (current.float() - previous).abs().mean()
    return (change / previous.abs().mean().clamp_min(1e-12)).item()


class ImplicitBranches:
    """Names the branches of pipelines that call the transformer outside `cache_context` (diffusers 0.42's
    FluxKontextPipeline): within a step such pipelines call the conditional branch first, then the unconditional
    one, so a call's position in its step (the step comes from the engine) names its branch."""

    NAMES = ("cond", "uncond")

    def __init__(self, state_manager: StateManager, clock: RequestClock):
        self.state_manager, self.clock = state_manager, clock
        self._step, self._calls, self._entered = -1, 0, None

    def _named_by_pipeline(self) -> bool:
        try:
            return self.state_manager.context is not None
        except ValueError:  # StateManager's way of saying that no context is set
            return False

    def before(self, transformer, args, kwargs) -> None:
        if self._named_by_pipeline():
            return
        if self.clock.step_index != self._step:
            self._step, self._calls = self.clock.step_index, 0
        name = self.NAMES[self._calls] if self._calls < len(self.NAMES) else f"branch{self._calls}"
        self._calls += 1
        self._entered = transformer.cache_context(name)
        self._entered.__enter__()

    def after(self, transformer, args, kwargs, output) -> None:
        if self._entered is not None:
            entered, self._entered = self._entered, None
            entered.__exit__(None, None, None)


# -- the backend ------------------------------------------------------------------------------------------------
class TeaCacheBackend(CacheBackend):
    name = "tea_cache"

    def __init__(self, config: TeaCacheConfig, settings: dict[str, Any] | None = None):
        self.config = config
        self.settings = settings or {}
        """The settings the config was built from (request overrides layer on top of these)."""
        self._clock: RequestClock | None = None
        self._transformer: torch.nn.Module | None = None
        self._model_coefficients: tuple[float, ...] = ()
        self._implicit_branch_hooks: list = []

    @classmethod
    def from_config(cls, config):
        return cls(parse_config(TeaCacheConfig, config, what="tea_cache"), dict(config or {}))

    @classmethod
    def merge_settings(cls, model_settings, user_settings):
        return layered_settings(model_settings, user_settings)

    def apply(self, pipeline) -> None:
        transformer = pipeline.transformer
        model = teacache_model_for(transformer)
        blocks = model.blocks(transformer)
        self._model_coefficients = model.coefficients
        self._clock = RequestClock(self.config, self.config.coefficients or model.coefficients)
        state_manager = StateManager(BranchState)
        for index, block in enumerate(blocks):
            is_tail = index == len(blocks) - 1
            io = BlockIO.of(block)
            registry = HookRegistry.check_if_exists_or_initialize(block)
            if index == 0:
                hook = TeaCacheHeadHook(state_manager, self._clock, io, is_tail, model.gate)
                registry.register_hook(hook, HEAD_HOOK)
            else:
                registry.register_hook(TeaCacheBlockHook(state_manager, self._clock, io, is_tail), BLOCK_HOOK)
        # New hooks below the transformer stale its cached list of child registries.
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        branches = ImplicitBranches(state_manager, self._clock)
        self._implicit_branch_hooks = [
            transformer.register_forward_pre_hook(branches.before, with_kwargs=True),
            transformer.register_forward_hook(branches.after, with_kwargs=True, always_call=True),
        ]
        self._transformer = transformer

    def remove(self, pipeline) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(pipeline.transformer)
        registry.remove_hook(HEAD_HOOK, recurse=True)
        registry.remove_hook(BLOCK_HOOK, recurse=True)
        registry.invalidate_child_registries_cache()
        for handle in self._implicit_branch_hooks:
            handle.remove()
        self._implicit_branch_hooks = []
        self._transformer = self._clock = None

    def _effective(self, overrides: dict[str, Any] | None) -> tuple[bool, TeaCacheConfig]:
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(f"unknown tea_cache setting(s) {unknown}; valid keys: {', '.join(OVERRIDE_KEYS)}")
        enabled = overrides.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"cache_config 'enabled' must be true or false, got {enabled!r}")
        settings = layered_settings(self.settings, overrides)
        return enabled, parse_config(TeaCacheConfig, settings, what="tea_cache")

    def check_overrides(self, overrides) -> None:
        self._effective(overrides)

    def begin_request(self, num_steps, overrides=None) -> None:
        enabled, config = self._effective(overrides)
        clock = self._clock
        if clock is None:  # not applied (or removed): nothing to prepare
            return
        clock.config = config
        clock.coefficients = config.coefficients or self._model_coefficients
        clock.enabled = enabled
        clock.num_steps = num_steps
        clock.step_index = 0
        clock.branches = {}
        # A request that ended in an exception never reached the pipeline's own reset: reset here too.
        HookRegistry.check_if_exists_or_initialize(self._transformer).reset_stateful_hooks()

    def set_step(self, step_index: int) -> None:
        if self._clock is not None:
            self._clock.step_index = step_index

    def record_outputs(self, enabled: bool = True) -> None:
        """Calibration mode: compute every step and record the block stack's output change next to the gate's."""
        self._clock.record_outputs = enabled

    def stats(self) -> dict[str, Any] | None:
        clock = self._clock
        if clock is None:
            return None
        branches = {name: dataclasses.asdict(stats) for name, stats in clock.branches.items()}
        if not clock.record_outputs:
            for branch in branches.values():
                del branch["output_rel_l1"]
        return {
            "backend": self.name,
            "enabled": clock.enabled,
            "rel_l1_thresh": clock.config.rel_l1_thresh,
            "num_steps": clock.num_steps,
            "computed_steps": sum(b["computed_steps"] for b in branches.values()),
            "skipped_steps": sum(b["skipped_steps"] for b in branches.values()),
            "branches": branches,
        }
