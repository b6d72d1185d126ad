"""TeaCache on diffusers' hook machinery.

TeaCache ("Timestep Embedding Tells: It's Time to Cache", arXiv 2411.19108) watches how much the
timestep-modulated input of the first transformer block changes from step to step. It rescales that relative
L1 change with a per-model polynomial, accumulates it, and while the sum stays below `rel_l1_thresh` it skips
the whole block stack, adding the residual (stack output minus stack input) of the last computed step instead.

Three hooks carry it out, as in diffusers' own caches: the head hook on the first block computes the gate
signal and decides; middle hooks pass their inputs through on a skipped step; the tail hook on the last block
stores the residual. Each `cache_context` ("cond", "uncond", ...) under which the pipeline calls the
transformer gets its own state through diffusers' StateManager, so CFG branches never mix. What differs per
model (block stack, gate, coefficients) comes from the transformer's registered `CacheTarget`.

Where the gate depends on the timestep alone (the target's `timestep_gate`: video models whose blocks are
modulated by the timestep embedding only), the whole schedule follows from the request's timesteps: a hook on the
transformer plans every step's gate and change at a branch's first call (`TimestepPlan`) and decides each later
call before its forward, computing no gate; with the target's shortcut a skipped call then runs only the
embeddings and the output head. The plan holds exactly: the decisions come from the same rule on the same numbers,
a call whose timestep is not the planned one (or a planned gate that is not the block's own) sends the branch back
to the gates of its calls. `plan_schedule` gives the schedule from the timesteps without running anything.

`apply_teacache(transformer, TeaCacheConfig(...))` attaches it to any transformer with a target; the
`tea_cache` backend does the same for the engine (on each of a pipeline's transformers, where a second one takes
the low-noise steps), which also tells it the step index and step count of each request (`begin_request`,
`set_step`) instead of having them counted from forwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import BaseState, StateManager

from .base import ROWS_CONTEXT, CacheBackend, contiguous_groups, is_number, parse_config, read_json_file, short_repr
from .targets import (
    ArgumentsHook,
    BlockIO,
    CacheTarget,
    CallOrderBranches,
    Gate,
    cache_target_for,
    denoising_transformers,
    relative_l1_of_rows,
)

NAME = "tea_cache"
HEAD_HOOK = "teaserve_teacache_head"
BLOCK_HOOK = "teaserve_teacache_block"
BRANCH_HOOK = "teaserve_teacache_branches"
TRANSFORMER_HOOK = "teaserve_teacache_transformer"

# -- bounds: every number a setting can carry is finite and bounded, so every statistic is too ----------------
MAX_REL_L1_THRESH = 1e9
"""A threshold this high skips every step but the first and the last."""
MAX_CONSECUTIVE_SKIPS = 10_000
MAX_RETENTION_STEPS = 10_000
MAX_COEFFICIENT = 1e9
MAX_GATE_CHANGE = 1e3
"""Largest end of a fitted gate-change range."""
DERIVED_RANGE_END = 1.0
"""Coefficients without a fitted range are trusted at most on (0, this]."""
MAX_PROFILE_BYTES = 1 << 20

REQUEST_KEYS = ("enabled", "rel_l1_thresh", "max_consecutive_skips")
COEFFICIENT_KEYS = ("coefficients", "x_range", "coefficients_file", "quality_table")
"""Settings that describe one rescaling polynomial and what it was calibrated to give; a layer of settings that has
any of them replaces them all."""


def check_threshold(value: Any) -> float:
    # Comparisons (not float()) so that 10**400 and NaN are refused instead of overflowing or slipping through.
    if not is_number(value) or not 0 < value <= MAX_REL_L1_THRESH:
        raise ValueError(f"rel_l1_thresh must be a number in (0, {MAX_REL_L1_THRESH:g}], got {short_repr(value)}")
    return float(value)


def check_retention_steps(value: Any) -> int | None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RETENTION_STEPS
    ):
        raise ValueError(
            f"retention_steps must be an integer in [1, {MAX_RETENTION_STEPS}] (or null for the coefficients' own), "
            f"got {short_repr(value)}"
        )
    return value


def check_max_consecutive_skips(value: Any) -> int | None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONSECUTIVE_SKIPS
    ):
        raise ValueError(
            f"max_consecutive_skips must be an integer in [1, {MAX_CONSECUTIVE_SKIPS}] (or null for unlimited), "
            f"got {short_repr(value)}"
        )
    return value


def check_coefficients(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or len(value) != 5:
        raise ValueError(f"coefficients must be a list of 5 numbers, highest power first, got {short_repr(value)}")
    if not all(is_number(c) and -MAX_COEFFICIENT <= c <= MAX_COEFFICIENT for c in value):
        raise ValueError(f"coefficients must be numbers in [-{MAX_COEFFICIENT:g}, {MAX_COEFFICIENT:g}]")
    return tuple(float(c) for c in value)


def check_x_range(value: Any) -> tuple[float, float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(is_number(end) and 0 <= end <= MAX_GATE_CHANGE for end in value)
        or not value[0] < value[1]
    ):
        raise ValueError(
            f"x_range must be [low, high] with 0 <= low < high <= {MAX_GATE_CHANGE:g} (the gate changes the "
            f"coefficients were fitted on), got {short_repr(value)}"
        )
    return float(value[0]), float(value[1])


# -- the rescaling polynomial ------------------------------------------------------------------------------------
def _polynomial(coefficients: Sequence[float], x: float) -> float:
    value = 0.0
    for coefficient in coefficients:
        value = value * x + coefficient
    return value


def derived_range(coefficients: Sequence[float]) -> tuple[float, float]:
    """For coefficients without a fitted range: the longest stretch of (0, DERIVED_RANGE_END] on which the
    polynomial is positive and non-decreasing (sampled finely), the only place it can be trusted blindly."""
    x = np.linspace(0.0, DERIVED_RANGE_END, 4097)[1:]
    values = np.polyval(coefficients, x)
    usable = values > 0
    best, start = (0, 0), None
    for index in range(len(x)):
        extends = start is not None and usable[index] and values[index] >= values[index - 1]
        if not extends:
            start = index if usable[index] else None
        if start is not None and index - start > best[1] - best[0]:
            best = (start, index)
    if best[1] == best[0]:
        raise ValueError(
            f"coefficients {list(coefficients)} are not positive and increasing anywhere in "
            f"(0, {DERIVED_RANGE_END:g}]; give the x_range they were fitted on"
        )
    return float(x[best[0]]), float(x[best[1]])


@dataclass(frozen=True)
class Rescaling:
    """Gate change x -> estimated output change, with the polynomial trusted only on the range it was fitted on.

    Inside `x_range` it is the polynomial. Above the range it continues linearly from the range's end with a
    positive slope (the polynomial's, or the end value's ratio to x if that is larger), so a larger change never
    counts as a smaller one. Below the range it falls in proportion to x from the smallest value in the range, so
    it never goes negative nor counts more than a change in the range. So it is positive for every x > 0: a
    threshold near zero computes every step. Without a fitted range, `derived_range` gives the trusted one.
    """

    coefficients: tuple[float, ...]
    x_range: tuple[float, float] | None = None
    trusted: tuple[float, float] = field(init=False)
    """The range the polynomial is used on: `x_range`, or the derived one."""
    _floor: float = field(init=False, repr=False)
    _end_value: float = field(init=False, repr=False)
    _slope: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        coefficients = check_coefficients(self.coefficients)
        x_range = None if self.x_range is None else check_x_range(self.x_range)
        low, high = x_range or derived_range(coefficients)
        values = np.polyval(coefficients, np.linspace(low, high, 1025))
        if not (values > 0).all():
            raise ValueError(
                f"coefficients {list(coefficients)} must be positive over their x_range [{low:g}, {high:g}] "
                f"(their smallest value there is {values.min():.4g})"
            )
        end_value = float(values[-1])
        derivative = _polynomial([float(c) for c in np.polyder(coefficients)], high)
        for name, value in (
            ("coefficients", coefficients),
            ("x_range", x_range),
            ("trusted", (low, high)),
            ("_floor", float(values.min())),
            ("_end_value", end_value),
            ("_slope", max(derivative, end_value / high)),
        ):
            object.__setattr__(self, name, value)

    def __call__(self, x: float) -> float:
        low, high = self.trusted
        if not x > 0:
            return 0.0
        if x < low:
            return self._floor * x / low
        if x <= high:
            return max(_polynomial(self.coefficients, x), self._floor)
        return self._end_value + self._slope * (x - high)


# -- configuration -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache settings.

    rel_l1_thresh: skip while the accumulated rescaled change stays below this (larger = faster), in (0, 1e9].
    coefficients: the rescaling polynomial, 5 numbers, highest power first; None = the transformer's built-in ones.
    x_range: the gate changes [low, high] the coefficients were fitted on (`teaserve calibrate` records it);
        None = derived from the polynomial (see `Rescaling`).
    max_consecutive_skips: computed at least every this many + 1 steps; None = unlimited (the original rule).
    retention_steps: the first this many steps are always computed; None = what the coefficients were published
        with (the transformer's target recommends it with its own coefficients), else 1 (the first step).

    `TeaCacheConfig.from_profile(path)` takes coefficients and range from a profile written by `teaserve calibrate`.
    """

    rel_l1_thresh: float = 0.2
    coefficients: Sequence[float] | None = None
    x_range: Sequence[float] | None = None
    max_consecutive_skips: int | None = None
    retention_steps: int | None = None
    rescaling: Rescaling | None = field(init=False, repr=False, compare=False)
    """The coefficients' rescaling, when coefficients are given."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rel_l1_thresh", check_threshold(self.rel_l1_thresh))
        check_max_consecutive_skips(self.max_consecutive_skips)
        check_retention_steps(self.retention_steps)
        rescaling = None
        if self.coefficients is not None:
            x_range = None if self.x_range is None else check_x_range(self.x_range)
            rescaling = Rescaling(check_coefficients(self.coefficients), x_range)
            object.__setattr__(self, "coefficients", rescaling.coefficients)
            object.__setattr__(self, "x_range", rescaling.x_range)
        elif self.x_range is not None:
            raise ValueError("x_range describes coefficients: give it together with coefficients")
        object.__setattr__(self, "rescaling", rescaling)

    @classmethod
    def from_profile(cls, path: str | Path, **settings: Any) -> TeaCacheConfig:
        """The coefficients and fitted range of a `teaserve calibrate` profile, with `settings` for the rest."""
        coefficients, x_range = read_profile(path)
        return cls(coefficients=coefficients, x_range=x_range, **settings)

    @classmethod
    def from_settings(cls, settings: dict[str, Any] | None) -> TeaCacheConfig:
        """Server settings (a JSON object): the fields, or `coefficients_file` in place of coefficients + x_range."""
        settings = dict(settings or {})
        path = settings.pop("coefficients_file", None)
        if path is not None:
            if "coefficients" in settings or "x_range" in settings:
                raise ValueError("give coefficients (and x_range) or coefficients_file, not both")
            if not isinstance(path, str):
                raise ValueError(f"coefficients_file must be a path, got {short_repr(path)}")
            parse_config(cls, settings, what=NAME, extra_keys=("coefficients_file",))  # report bad keys first
            settings["coefficients"], settings["x_range"] = read_profile(path)
        return parse_config(cls, settings, what=NAME, extra_keys=("coefficients_file",))


def read_profile(path: str | Path) -> tuple[Any, Any]:
    """(coefficients, x_range or None) of a calibration profile: a small JSON file with a "coefficients" list."""
    path = Path(path)
    profile = read_json_file(path, f"coefficients_file {str(path)!r}", MAX_PROFILE_BYTES)
    if not isinstance(profile, dict) or "coefficients" not in profile:
        raise ValueError(f'coefficients_file {str(path)!r} has no "coefficients" (write it with teaserve calibrate)')
    return profile["coefficients"], profile.get("x_range")


def layered_settings(*layers: dict[str, Any] | None) -> dict[str, Any]:
    """Later settings over earlier ones; the coefficient settings (COEFFICIENT_KEYS) replace each other as one."""
    merged: dict[str, Any] = {}
    for layer in layers:
        layer = layer or {}
        if any(key in layer for key in COEFFICIENT_KEYS):
            for key in COEFFICIENT_KEYS:
                merged.pop(key, None)
        merged.update(layer)
    return merged


def rescaling_and_retention(
    config: TeaCacheConfig, target: CacheTarget, transformer: torch.nn.Module
) -> tuple[Rescaling, int]:
    """(the rescaling, the retention steps): the config's coefficients, else the ones the transformer's target
    recommends, with the retention the config gives, else the one that goes with those coefficients."""
    if config.rescaling is not None:
        return config.rescaling, config.retention_steps or 1
    recommended = target.recommended(transformer, NAME)
    if "coefficients" not in recommended:
        raise ValueError(
            f"tea_cache has no coefficients for transformer {type(transformer).__name__}: fit them with "
            "`teaserve calibrate` and pass them as coefficients (or coefficients_file)"
        )
    rescaling = Rescaling(tuple(recommended["coefficients"]), recommended.get("x_range"))
    return rescaling, config.retention_steps or recommended.get("retention_steps", 1)


# -- the decision rule -------------------------------------------------------------------------------------------
@dataclass
class BranchStats:
    """What happened to one CFG branch during one request."""

    computed_steps: int = 0
    skipped_steps: int = 0
    schedule: str = ""
    """One letter per step: C computed, S skipped."""
    rel_l1: list[float | None] = field(default_factory=list)
    """Relative L1 change of the gate signal at each step (None where there is nothing to compare with)."""
    accumulated: list[float] = field(default_factory=list)
    """The accumulated rescaled change compared with the threshold at each step (0 where forced)."""
    planned_schedule: str | None = None
    """Where the gate depends on the timestep alone: the schedule planned from the request's timesteps at the
    branch's first step, before any block ran (it is the schedule above unless the calls left the plan)."""


@dataclass
class TeaCachePolicy:
    """The TeaCache rule for one branch: the first `retention_steps` and the last step computed, skip while the sum
    stays below thresh."""

    rescaling: Rescaling
    rel_l1_thresh: float
    max_consecutive_skips: int | None = None
    retention_steps: int = 1
    accumulated: float = 0.0
    consecutive_skips: int = 0

    def should_compute(self, rel_l1: float | None, step_index: int, num_steps: int | None, stats: BranchStats) -> bool:
        last = num_steps is not None and step_index >= num_steps - 1
        forced = rel_l1 is None or step_index < self.retention_steps or last
        if rel_l1 is None or forced:
            self.accumulated = 0.0
        else:
            self.accumulated += self.rescaling(rel_l1)
        limit = self.max_consecutive_skips
        skip = (
            not forced and self.accumulated < self.rel_l1_thresh and (limit is None or self.consecutive_skips < limit)
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


# -- hooks -------------------------------------------------------------------------------------------------------
Timesteps = Callable[[], torch.Tensor | None]
"""Where a request's timesteps can be read once its first step runs (the pipeline's scheduler's), one per step."""


@dataclass
class RequestClock:
    """Shared by a TeaCache and its hooks: the settings and the position of the current request."""

    rescaling: Rescaling
    rel_l1_thresh: float
    max_consecutive_skips: int | None
    retention_steps: int = 1
    enabled: bool = True
    num_steps: int | None = None
    """None: unknown, so no last step is forced."""
    step_index: int | None = None
    """None: not driven by an engine; each branch counts its own calls since the pipeline's last reset."""
    branches: dict[str, BranchStats] = field(default_factory=dict)
    row_groups: list[tuple[str, slice]] | None = None
    """The request's row groups in batched calls (`set_row_groups`); None: a call's rows are one branch, named by
    its cache context."""

    def groups(self, context: str) -> list[tuple[str, slice]]:
        if self.row_groups is not None and context == ROWS_CONTEXT:
            return self.row_groups
        return [(context, slice(None))]

    def new_policy(self) -> TeaCachePolicy:
        return TeaCachePolicy(self.rescaling, self.rel_l1_thresh, self.max_consecutive_skips, self.retention_steps)


@dataclass
class TimestepPlan:
    """One branch's gate at each step of a request, known from its timesteps before the branch's first step (for
    targets with a timestep gate). Step `first_step + i` is planned to run with step argument `values[i]`, its gate
    is `gates[i]` and the gate's change since the step before, per row group, `changes[i]` (None for i = 0)."""

    first_step: int
    values: list[torch.Tensor]
    gates: list[torch.Tensor]
    changes: list[Sequence[float] | None]

    @classmethod
    def make(
        cls, target: CacheTarget, transformer: torch.nn.Module, value: torch.Tensor, timesteps: torch.Tensor,
        first_step: int, rows: list[slice],
    ) -> TimestepPlan | None:  # fmt: skip
        """The plan from `first_step` on, where step i's argument is `value` (the first call's) filled with
        timesteps[i]; None where the target's timestep gate does not determine the gate of such calls."""
        assert target.timestep_gate is not None
        values, gates = [], []
        for timestep in timesteps[first_step:].tolist():
            step_value = torch.full_like(value, timestep)
            gate = target.timestep_gate(transformer, step_value)
            if gate is None:
                return None
            values.append(step_value)
            gates.append(gate.detach())
        if not gates:
            return None
        # The same computation as at a call, so that every planned change equals the one a call would find.
        changes = [None] + [relative_l1_of_rows(gate, previous, rows) for previous, gate in pairwise(gates)]
        return cls(first_step, values, gates, changes)

    def index(self, step: int, value: torch.Tensor) -> int | None:
        """The plan's index of a call of step `step` with step argument `value`; None where the call is not the
        planned one (the pipeline runs other timesteps than its scheduler's)."""
        index = step - self.first_step
        if 0 <= index < len(self.values) and torch.equal(value, self.values[index]):
            return index
        return None

    def schedules(self, clock: RequestClock, names: list[str]) -> dict[str, str]:
        """The schedule each row group will follow: the rule run over the planned changes."""
        schedules = {}
        for group, name in enumerate(names):
            policy, stats = clock.new_policy(), BranchStats()
            for index, changes in enumerate(self.changes):
                policy.should_compute(None if changes is None else changes[group], self.first_step + index,
                                      clock.num_steps, stats)  # fmt: skip
            schedules[name] = stats.schedule
        return schedules


class BranchState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.policies: dict[str, TeaCachePolicy] = {}
        """One per row group: a branch of a request alone, or its rows in a batched call."""
        self.calls = 0
        self.previous_gate: torch.Tensor | None = None
        self.skipping = False
        """Every row skips this call."""
        self.decided: tuple[list[slice], bool] | None = None
        """The transformer hook's decision for the call under way (the rows that skip, whether all do), for the head
        hook to apply."""
        self.reused_rows: list[slice] = []
        """Rows that skip while others compute: at the tail their output becomes inputs plus cached residual."""
        self.head_inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.residuals: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.plan: TimestepPlan | None = None
        self.unchecked_gate: torch.Tensor | None = None
        """The plan's gate of the call under way, for the head hook to compare with the block's own (first call)."""


class TeaCacheBlockHook(ArgumentsHook):
    """Middle and tail blocks: pass inputs through while skipping; the tail stores the residual."""

    def __init__(self, state_manager: StateManager, clock: RequestClock, io: BlockIO, is_tail: bool):
        super().__init__()
        self.state_manager, self.clock, self.io, self.is_tail = state_manager, clock, io, is_tail

    def new_forward(self, module, *args, **kwargs):
        if not self.clock.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        state: BranchState = self.state_manager.get_state()
        if state.skipping:
            return self.io.join(*self.io.inputs(self.arguments(args, kwargs)))
        output = self.fn_ref.original_forward(*args, **kwargs)
        return self._store_residuals(state, output) if self.is_tail else output

    def _store_residuals(self, state: BranchState, output):
        """Keep the residuals of the rows that computed. Rows that skip while others compute come out as inputs
        plus their cached residual, so every row gets what its group gets in a call of its own."""
        hidden, encoder = self.io.split(output)
        assert state.head_inputs is not None, "the tail runs only after the head computed"
        head_hidden, head_encoder = state.head_inputs
        hidden_residual = hidden - head_hidden
        encoder_residual = None if encoder is None or head_encoder is None else encoder - head_encoder
        if state.reused_rows:
            assert state.residuals is not None, "rows skip only after a computed step"
            cached_hidden, cached_encoder = state.residuals
            for rows in state.reused_rows:
                hidden_residual[rows] = cached_hidden[rows]
                if encoder_residual is not None and cached_encoder is not None:
                    encoder_residual[rows] = cached_encoder[rows]
            hidden = head_hidden + hidden_residual
            if encoder_residual is not None and head_encoder is not None:
                encoder = head_encoder + encoder_residual
            output = self.io.join(hidden, encoder)
        state.residuals = (hidden_residual, encoder_residual)
        return output


def gate_changes(clock: RequestClock, state: BranchState, context: str, gate: torch.Tensor) -> Sequence[float | None]:
    """The relative change of `gate` since the branch's previous call, per row group (None: nothing to compare
    with); `gate` becomes the previous one."""
    previous, state.previous_gate = state.previous_gate, gate
    groups = clock.groups(context)
    if previous is None or previous.shape != gate.shape or state.residuals is None:
        return [None] * len(groups)
    return list(relative_l1_of_rows(gate, previous, [rows for _, rows in groups]))


def decide(
    clock: RequestClock, state: BranchState, context: str, changes: Sequence[float | None]
) -> tuple[list[slice], bool]:
    """The TeaCache rule for one call, given the gate's change per row group: (the rows of the groups that skip,
    whether every group skips)."""
    step_index = state.calls if clock.step_index is None else clock.step_index
    state.calls += 1
    groups = clock.groups(context)
    skipped = []
    for (name, rows), rel_l1 in zip(groups, changes, strict=True):
        policy = state.policies.get(name)
        if policy is None:  # the group's first call since the last reset: a new request
            policy = state.policies[name] = clock.new_policy()
            clock.branches[name] = BranchStats()
        if not policy.should_compute(rel_l1, step_index, clock.num_steps, clock.branches[name]):
            skipped.append(rows)
    return skipped, len(skipped) == len(groups)


class TeaCacheHeadHook(TeaCacheBlockHook):
    """First block: compute the gate signal, decide, and on a skip return inputs plus the cached residual (unless
    the transformer hook decided already)."""

    _is_stateful = True

    def __init__(self, state_manager, clock, io, is_tail, gate: Gate):
        super().__init__(state_manager, clock, io, is_tail)
        self.gate = gate

    def new_forward(self, module, *args, **kwargs):
        clock = self.clock
        if not clock.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        arguments = self.arguments(args, kwargs)
        state: BranchState = self.state_manager.get_state()
        if state.decided is not None:
            (skipped, state.skipping), state.decided = state.decided, None
            if state.unchecked_gate is not None:
                self._check_plan(module, arguments, state)
        else:
            context = self.state_manager.context.name
            gate = self.gate(module, arguments).detach()
            skipped, state.skipping = decide(clock, state, context, gate_changes(clock, state, context, gate))
        hidden, encoder = self.io.inputs(arguments)
        if state.skipping:
            assert state.residuals is not None, "a step is skipped only after a computed one (rel_l1 needs it)"
            hidden_residual, encoder_residual = state.residuals
            if encoder is not None and encoder_residual is not None:
                encoder = encoder + encoder_residual
            return self.io.join(hidden + hidden_residual, encoder)
        state.reused_rows = skipped
        state.head_inputs = (hidden, encoder)
        output = self.fn_ref.original_forward(*args, **kwargs)
        return self._store_residuals(state, output) if self.is_tail else output

    def _check_plan(self, module, arguments: dict[str, Any], state: BranchState) -> None:
        """A plan's first call (always computed): its gate must be the block's own, else the branch leaves the plan
        (and its planned schedules go) and goes on from the block's gate."""
        gate, planned = self.gate(module, arguments).detach(), state.unchecked_gate
        if planned is None or not torch.equal(gate, planned):
            state.plan, state.previous_gate = None, gate
            for name, _ in self.clock.groups(self.state_manager.context.name):
                self.clock.branches[name].planned_schedule = None
        state.unchecked_gate = None

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class TeaCacheTransformerHook(ArgumentsHook):
    """On the transformer, where its target declares a timestep gate or a `StackShortcut`: decide before the
    forward.

    With a timestep gate, the branch's first call plans the gate of every step from the request's timesteps
    (`TimestepPlan`); the calls that run the planned timesteps then decide from the plan, computing no gate. With a
    shortcut, a call that every row skips runs only the shortcut (embeddings, output head) instead of the whole
    forward, whose text stream, position embeddings and pass-through blocks a skipped step does not need; the
    output is the one the block hooks give: the first block's input plus the cached residual, through the output
    head."""

    def __init__(
        self, state_manager: StateManager, clock: RequestClock, target: CacheTarget, head: torch.nn.Module,
        timesteps: Timesteps | None,
    ):  # fmt: skip
        super().__init__()
        self.state_manager, self.clock, self.target, self.head = state_manager, clock, target, head
        self.shortcut, self.timesteps = target.shortcut, timesteps

    def new_forward(self, module, *args, **kwargs):
        if not self.clock.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        arguments = self.arguments(args, kwargs)
        state: BranchState = self.state_manager.get_state()
        context = self.state_manager.context.name
        first_call = state.calls == 0
        changes = self._planned_changes(module, state, context, arguments)
        entered = None
        if changes is None:  # the gate comes from the call
            if self.shortcut is None:
                return self.fn_ref.original_forward(*args, **kwargs)
            entered = self.shortcut.enter(module, arguments)
            if entered is None:
                return self.fn_ref.original_forward(*args, **kwargs)
            gate = self.target.gate(self.head, {"hidden_states": entered[0], "temb": entered[1]}).detach()
            changes = gate_changes(self.clock, state, context, gate)
        skipped, every = decide(self.clock, state, context, changes)
        if first_call and state.plan is not None:
            self._report(state.plan, context)
        if every and self.shortcut is not None:
            entered = entered or self.shortcut.enter(module, arguments)
            if entered is not None:
                assert state.residuals is not None, "a step is skipped only after a computed one (rel_l1 needs it)"
                hidden, temb = entered
                return self.shortcut.leave(module, hidden + state.residuals[0], temb, arguments)
        state.decided = (skipped, every)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _planned_changes(
        self, module, state: BranchState, context: str, arguments: dict[str, Any]
    ) -> Sequence[float | None] | None:
        """The gate's change per row group from the branch's plan (made at its first call); None where the call
        is not a planned one: the branch then decides from the call's own gate, now and later."""
        value = arguments.get(self.target.step_argument)
        if self.target.timestep_gate is None or self.timesteps is None or not isinstance(value, torch.Tensor):
            return None
        step = state.calls if self.clock.step_index is None else self.clock.step_index
        groups = self.clock.groups(context)
        if state.calls == 0:
            state.plan = self._plan(module, value, step, [rows for _, rows in groups])
        plan = state.plan
        index = None if plan is None else plan.index(step, value)
        if plan is None or index is None:
            state.plan = None
            return None
        previous, gate = state.previous_gate, plan.gates[index]
        if previous is None:  # the plan's first call: the head hook checks the planned gate against the block's
            state.unchecked_gate = gate
        if index > 0 and previous is plan.gates[index - 1] and state.residuals is not None:
            state.previous_gate = gate
            return plan.changes[index]
        return gate_changes(self.clock, state, context, gate)

    def _plan(self, module, value: torch.Tensor, step: int, rows: list[slice]) -> TimestepPlan | None:
        assert self.timesteps is not None
        timesteps = self.timesteps()
        if timesteps is None or timesteps.ndim != 1 or not 0 <= step < len(timesteps):
            return None
        return TimestepPlan.make(self.target, module, value, timesteps, step, rows)

    def _report(self, plan: TimestepPlan, context: str) -> None:
        """File each group's planned schedule in its statistics (which `decide` opened at its first call)."""
        names = [name for name, _ in self.clock.groups(context)]
        for name, schedule in plan.schedules(self.clock, names).items():
            self.clock.branches[name].planned_schedule = schedule


class TeaCache:
    """TeaCache's hooks on one transformer; `apply_teacache` makes one, `remove_teacache` takes the hooks off.

    Without an engine, each CFG branch counts its own transformer calls (diffusers resets the count after every
    pipeline call) and `num_inference_steps`, when known, marks the last step, which is always computed.
    `timesteps`, where the target has a timestep gate, reads the request's timesteps (see `TimestepPlan`).
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        config: TeaCacheConfig,
        target: CacheTarget,
        num_inference_steps: int | None = None,
        timesteps: Timesteps | None = None,
    ):
        self.transformer, self.target, self.config = transformer, target, config
        rescaling, retention_steps = rescaling_and_retention(config, target, transformer)
        blocks = target.block_stack(transformer)
        self.clock = RequestClock(
            rescaling,
            config.rel_l1_thresh,
            config.max_consecutive_skips,
            retention_steps=retention_steps,
            num_steps=num_inference_steps,
        )
        state_manager = StateManager(BranchState)
        for index, block in enumerate(blocks):
            is_tail = index == len(blocks) - 1
            io = BlockIO.of(block)
            registry = HookRegistry.check_if_exists_or_initialize(block)
            if index == 0:
                registry.register_hook(TeaCacheHeadHook(state_manager, self.clock, io, is_tail, target.gate), HEAD_HOOK)
            else:
                registry.register_hook(TeaCacheBlockHook(state_manager, self.clock, io, is_tail), BLOCK_HOOK)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        if target.shortcut is not None or (target.timestep_gate is not None and timesteps is not None):
            # Inside the branch naming hook, which sets the context it reads.
            hook = TeaCacheTransformerHook(state_manager, self.clock, target, blocks[0], timesteps)
            registry.register_hook(hook, TRANSFORMER_HOOK)
        registry.register_hook(CallOrderBranches(state_manager, target), BRANCH_HOOK)
        # New hooks below the transformer stale its cached list of child registries.
        registry.invalidate_child_registries_cache()

    @property
    def num_inference_steps(self) -> int | None:
        return self.clock.num_steps

    @num_inference_steps.setter
    def num_inference_steps(self, value: int | None) -> None:
        self.clock.num_steps = value

    def configure(self, config: TeaCacheConfig) -> None:
        """New settings from the next step on (bad coefficients raise and change nothing)."""
        rescaling, retention_steps = rescaling_and_retention(config, self.target, self.transformer)
        self.config = config
        self.clock.rescaling, self.clock.retention_steps = rescaling, retention_steps
        self.clock.rel_l1_thresh, self.clock.max_consecutive_skips = config.rel_l1_thresh, config.max_consecutive_skips

    def begin_request(self, num_steps: int, overrides: dict[str, Any] | None = None) -> None:
        """Driven mode: a request of `num_steps` steps begins; `overrides` are validated request settings."""
        overrides = overrides or {}
        clock, config = self.clock, self.config
        clock.enabled = overrides.get("enabled", True)
        clock.rel_l1_thresh = overrides.get("rel_l1_thresh", config.rel_l1_thresh)
        clock.max_consecutive_skips = overrides.get("max_consecutive_skips", config.max_consecutive_skips)
        clock.num_steps, clock.step_index, clock.branches, clock.row_groups = num_steps, 0, {}, None
        # A request that ended in an exception never reached the pipeline's own reset: reset here too.
        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks()

    def set_step(self, step_index: int) -> None:
        self.clock.step_index = step_index

    def set_row_groups(self, labels: Sequence[str]) -> None:
        """Driven mode: calls under ROWS_CONTEXT carry these row groups (see CacheBackend.set_row_groups)."""
        self.clock.row_groups = contiguous_groups(labels)

    def stats(self) -> dict[str, Any]:
        clock = self.clock
        branches = {name: dataclasses.asdict(stats) for name, stats in clock.branches.items()}
        return {
            "backend": NAME,
            "enabled": clock.enabled,
            "rel_l1_thresh": clock.rel_l1_thresh,
            "num_steps": clock.num_steps,
            "computed_steps": sum(b["computed_steps"] for b in branches.values()),
            "skipped_steps": sum(b["skipped_steps"] for b in branches.values()),
            "branches": branches,
        }


def apply_teacache(
    transformer: torch.nn.Module,
    config: TeaCacheConfig | None = None,
    *,
    target: CacheTarget | None = None,
    num_inference_steps: int | None = None,
    timesteps: Timesteps | None = None,
) -> TeaCache:
    """Attach TeaCache to `transformer` (a diffusers pipeline's `pipe.transformer`).

    `target` defaults to the one registered for the transformer's class (teaserve registers those of the models
    it serves); the coefficients default to the target's. Pass `num_inference_steps` (or set it on the returned
    object) so that the last step is always computed, and, for targets with a timestep gate, `timesteps` (e.g.
    `lambda: pipe.scheduler.timesteps`) so that each request's schedule is planned before its first step. The
    returned object reports `stats()` of the last call.
    """
    if HookRegistry.check_if_exists_or_initialize(transformer).get_hook(BRANCH_HOOK) is not None:
        raise ValueError("TeaCache is already applied to this transformer; remove_teacache() it first")
    target = target or cache_target_for(transformer)
    return TeaCache(transformer, config or TeaCacheConfig(), target, num_inference_steps, timesteps)


@torch.no_grad()
def plan_schedule(
    transformer: torch.nn.Module,
    timesteps: torch.Tensor,
    config: TeaCacheConfig | None = None,
    *,
    target: CacheTarget | None = None,
    rows: int = 1,
) -> str | None:
    """The schedule (one letter per step: C computed, S skipped) TeaCache follows in each branch of a request whose
    steps run `timesteps`, from the timesteps alone, before anything runs; None where the transformer's target has
    no timestep gate. `rows`: the rows of each transformer call (what a pipeline passes; the changes it gives are
    the calls' own to the last bit when it matches)."""
    target = target or cache_target_for(transformer)
    if target.timestep_gate is None:
        return None
    config = config or TeaCacheConfig()
    rescaling, retention_steps = rescaling_and_retention(config, target, transformer)
    clock = RequestClock(
        rescaling, config.rel_l1_thresh, config.max_consecutive_skips, retention_steps, num_steps=len(timesteps)
    )
    value = torch.zeros(rows, dtype=timesteps.dtype, device=timesteps.device)
    plan = TimestepPlan.make(target, transformer, value, timesteps, 0, [slice(None)])
    return None if plan is None else plan.schedules(clock, ["branch"])["branch"]


def remove_teacache(transformer: torch.nn.Module) -> None:
    """Take TeaCache's hooks off `transformer`: it computes every step again."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in (BRANCH_HOOK, TRANSFORMER_HOOK, HEAD_HOOK, BLOCK_HOOK):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


# -- the backend -------------------------------------------------------------------------------------------------
class TeaCacheBackend(CacheBackend):
    """`tea_cache`: server settings are TeaCacheConfig's fields or `coefficients_file`; a request may set
    `enabled`, `rel_l1_thresh` and `max_consecutive_skips`."""

    name = NAME
    request_keys = REQUEST_KEYS
    request_checks = {"rel_l1_thresh": check_threshold, "max_consecutive_skips": check_max_consecutive_skips}
    tuning_key = "rel_l1_thresh"
    tuning_values = (0.1, 0.2, 0.4, 0.6, 0.8)
    supports_row_groups = True

    def __init__(self) -> None:
        super().__init__()
        self.config = TeaCacheConfig()
        self._teacaches: list[TeaCache] = []
        """One per transformer of the pipeline, in the order its steps use them."""

    @classmethod
    def merge_settings(cls, model_settings, user_settings):
        return layered_settings(model_settings, user_settings)

    def configure_method(self, settings) -> None:
        config = TeaCacheConfig.from_settings(settings)
        for teacache in self._teacaches:  # every transformer takes the settings, or none does
            rescaling_and_retention(config, teacache.target, teacache.transformer)
        for teacache in self._teacaches:
            teacache.configure(config)
        self.config = config

    def apply(self, pipeline) -> None:
        try:
            for transformer in denoising_transformers(pipeline):
                teacache = apply_teacache(
                    transformer, self.config, timesteps=lambda: getattr(pipeline.scheduler, "timesteps", None)
                )
                self._teacaches.append(teacache)
        except Exception:
            self.remove(pipeline)
            raise

    def remove(self, pipeline) -> None:
        for teacache in self._teacaches:
            remove_teacache(teacache.transformer)
        self._teacaches = []

    def start_request(self, num_steps, overrides) -> None:
        for teacache in self._teacaches:
            teacache.begin_request(num_steps, overrides)

    def set_step(self, step_index: int) -> None:
        for teacache in self._teacaches:
            teacache.set_step(step_index)

    def set_row_groups(self, labels) -> None:
        for teacache in self._teacaches:
            teacache.set_row_groups(labels)

    def request_stats(self) -> dict[str, Any] | None:
        if not self._teacaches:  # not applied (or removed): nothing to report
            return None
        parts = [teacache.stats() for teacache in self._teacaches]
        branches = joined_branches([part["branches"] for part in parts])
        return {
            **parts[0],
            "computed_steps": sum(branch["computed_steps"] for branch in branches.values()),
            "skipped_steps": sum(branch["skipped_steps"] for branch in branches.values()),
            "branches": branches,
        }


def joined_branches(parts: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The statistics per branch of transformers that ran a request's steps one after the other (one for the
    high-noise steps, one for the low-noise ones), as one transformer's."""
    joined: dict[str, dict[str, Any]] = {}
    for position, branches in enumerate(parts):
        for name, stats in branches.items():
            stats = dict(stats)
            planned = stats["planned_schedule"]
            if planned is not None and position < len(parts) - 1:
                # A transformer's plan covers every remaining step of the request: the ones it ran are its own.
                stats["planned_schedule"] = planned[: len(stats["schedule"])]
            into = joined.setdefault(name, stats)
            if into is stats:
                continue
            for key in ("computed_steps", "skipped_steps", "schedule", "rel_l1", "accumulated"):
                into[key] = into[key] + stats[key]
            if into["planned_schedule"] is not None and stats["planned_schedule"] is not None:
                into["planned_schedule"] += stats["planned_schedule"]
            else:
                into["planned_schedule"] = None
    return joined
