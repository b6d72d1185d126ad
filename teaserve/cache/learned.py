"""A learned forecaster of the transformer's output on skipped steps (the idea of L2P, arXiv 2604.26365).

Forecasting caches such as TaylorSeer predict a skipped step's features as a fixed linear combination of the
features of the last computed steps. L2P learns that combination instead, per step, from a few uncached
trajectories. Here the forecast is of the whole transformer's output (its velocity prediction), so a skipped step
runs nothing of the transformer: no embeddings, no gate, no block. Which steps are computed is a fixed schedule:
about `num_steps / speedup` steps, the first and the last among them, placed by `schedule_power`; on every
other step, each CFG branch's output is `sum_k w[s][k] * output(c_k)` over its last K computed steps c_1, c_2, ...
(most recent first).

The weights w[s] are least-squares fits (`ForecastCalibrator`, run by `teaserve calibrate`): for every step
count and schedule, the output at each skipped step regressed on the outputs of the schedule's last computed
steps, summed over calibration prompts and CFG branches. Only a Gram matrix of the outputs of every pair of steps
is accumulated per step count, so calibrating costs memory for one trajectory whatever the prompt count, and every
schedule is fitted from it afterwards. A schedule without fitted weights reuses the last computed output (w = [1]),
which the stats report as the "reuse" forecast.

What it gains where, measured on the embedded model (30 steps, held-out captions): skipping the whole
transformer call instead of the block stack alone turns the same number of evaluations into more end-to-end speed
(TeaCache still runs the embeddings, its gate and the output head on a skipped step); packing the computed steps
towards the end of the request (`schedule_power` 0.7, chosen by `teaserve calibrate` among fits for several powers)
keeps 2 to 5 dB more than spreading them evenly; the fitted weights themselves stay close to 1 there (0.96 to 1.01)
and add a few tenths of a dB over plain reuse. One computed output of history beat two at every speedup (the last
two computed outputs are far apart once most steps are skipped, so a fitted extrapolation amplifies their difference
more than it predicts), so the calibrator fits K = 1 unless told otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .base import ROWS_CONTEXT, CacheBackend, Calibrator, contiguous_groups, is_number, parse_config, short_repr
from .targets import CacheTarget, CallOrderBranches, cache_target_for, only_transformer

NAME = "learned"
FORECAST_HOOK = "teaserve_learned_forecast"
RECORD_HOOK = "teaserve_learned_record"

MAX_SPEEDUP = 1000.0
MAX_HISTORY = 8
MAX_WEIGHT = 1e3
MAX_STEPS = 1000
MAX_STEP_COUNTS = 16
MIN_POWER, MAX_POWER = 0.2, 5.0
DEFAULT_SCHEDULE_POWER = 0.7
"""Measured on the embedded model at 30 steps (8 held-out captions, 8 to 16 block evaluations per request): the
computed steps packed towards the end at 0.7 kept 2 to 5 dB more than evenly spread ones (1.0); errors of the
early, noisy steps are corrected by the later ones, errors of the last steps stay in the image."""
REQUEST_KEYS = ("enabled", "speedup")


def check_speedup(value: Any) -> float:
    if not is_number(value) or not 1 <= value <= MAX_SPEEDUP:
        raise ValueError(f"speedup must be a number in [1, {MAX_SPEEDUP:g}], got {short_repr(value)}")
    return float(value)


def check_schedule_power(value: Any) -> float:
    if not is_number(value) or not MIN_POWER <= value <= MAX_POWER:
        raise ValueError(f"schedule_power must be a number in [{MIN_POWER:g}, {MAX_POWER:g}], got {short_repr(value)}")
    return float(value)


def computed_count(num_steps: int, speedup: float) -> int:
    """How many of `num_steps` steps a request computes at `speedup`: about num_steps / speedup, at least two."""
    return min(num_steps, max(2, round(num_steps / speedup)))


def computed_steps(num_steps: int, count: int, power: float = 1.0) -> frozenset[int]:
    """`count` distinct steps of `num_steps`, the first and the last among them, at (num_steps - 1) * u ** power
    for u evenly spaced in [0, 1]: evenly spread at power 1, denser towards the end below 1."""
    places = np.round((num_steps - 1) * np.linspace(0.0, 1.0, count) ** power).astype(int)
    steps: list[int] = []
    for index, place in enumerate(places):
        # Distinct, and room left for the steps still to place.
        steps.append(min(max(int(place), steps[-1] + 1 if steps else 0), num_steps - count + index))
    return frozenset(steps)


def check_forecast_weights(value: Any, power: float) -> dict[int, dict[int, tuple[tuple[float, ...] | None, ...]]]:
    """`{"30": {"6": [null, [w1, ...], ...]}}`: per step count, per number of computed steps, one entry per step
    (null on computed steps, else the weights of the last computed outputs, most recent first)."""
    shape = 'forecast_weights must look like {"30": {"6": [null, [1.02], ...]}} (written by teaserve calibrate)'
    if not isinstance(value, dict) or not 0 < len(value) <= MAX_STEP_COUNTS:
        raise ValueError(f"{shape}, with 1 to {MAX_STEP_COUNTS} step counts")
    weights: dict[int, dict[int, tuple[tuple[float, ...] | None, ...]]] = {}
    for steps_key, schedules in value.items():
        steps = _count(steps_key, MAX_STEPS, shape)
        if not isinstance(schedules, dict) or len(schedules) > steps:
            raise ValueError(f"{shape}; step count {steps} needs at most {steps} schedules")
        weights[steps] = {}
        for count_key, per_step in schedules.items():
            count = _count(count_key, steps, shape)
            schedule = computed_steps(steps, count, power)
            if not isinstance(per_step, list) or len(per_step) != steps:
                raise ValueError(f"{shape}; the schedule of {count} of {steps} steps needs {steps} entries")
            entries: list[tuple[float, ...] | None] = []
            for step, entry in enumerate(per_step):
                if (step in schedule) != (entry is None):
                    raise ValueError(
                        f"forecast_weights of {count} of {steps} steps were fitted for another schedule than "
                        f"schedule_power {power:g} gives: calibrate again, or give the schedule_power of the fit"
                    )
                if entry is None:
                    entries.append(None)
                    continue
                if not (
                    isinstance(entry, list)
                    and 0 < len(entry) <= MAX_HISTORY
                    and all(is_number(w) and -MAX_WEIGHT <= w <= MAX_WEIGHT for w in entry)
                ):
                    raise ValueError(
                        f"{shape}; weights are 1 to {MAX_HISTORY} numbers in [-{MAX_WEIGHT:g}, "
                        f"{MAX_WEIGHT:g}], got {short_repr(entry)}"
                    )
                entries.append(tuple(float(w) for w in entry))
            weights[steps][count] = tuple(entries)
    return weights


def _count(key: Any, limit: int, shape: str) -> int:
    if not (isinstance(key, str | int) and str(key).isdecimal() and 0 < int(key) <= limit):
        raise ValueError(f"{shape}; {short_repr(key)} is not a count in [1, {limit}]")
    return int(key)


@dataclass(frozen=True)
class LearnedCacheConfig:
    """Settings of the learned forecaster.

    speedup: compute about num_steps / speedup steps (larger = faster), in [1, 1000].
    schedule_power: where the computed steps lie: at (num_steps - 1) * u ** schedule_power, u evenly spaced in
        [0, 1]; 1 spreads them evenly, below 1 packs them towards the end, in [0.2, 5].
    forecast_weights: fitted weights per step count and schedule (`teaserve calibrate` writes them, for the
        schedule_power it writes beside them); None or a missing schedule = reuse the last computed output.
    """

    speedup: float = 3.0
    schedule_power: float = DEFAULT_SCHEDULE_POWER
    forecast_weights: Any = None
    schedules: dict[int, dict[int, tuple[tuple[float, ...] | None, ...]]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "speedup", check_speedup(self.speedup))
        power = check_schedule_power(self.schedule_power)
        object.__setattr__(self, "schedule_power", power)
        schedules = {} if self.forecast_weights is None else check_forecast_weights(self.forecast_weights, power)
        object.__setattr__(self, "schedules", schedules)

    def plan(self, num_steps: int, speedup: float) -> tuple[frozenset[int], tuple[tuple[float, ...] | None, ...]]:
        """(computed steps, weights per step) of a request; fitted weights where calibrated, else reuse."""
        count = computed_count(num_steps, speedup)
        schedule = computed_steps(num_steps, count, self.schedule_power)
        fitted = self.schedules.get(num_steps, {}).get(count)
        if fitted is not None:
            return schedule, fitted
        return schedule, tuple(None if step in schedule else REUSE for step in range(num_steps))


REUSE = (1.0,)
"""The forecast without fitted weights: the last computed output as it is."""


# -- hooks ---------------------------------------------------------------------------------------------------------
def primary_tensor(output) -> torch.Tensor:
    """The transformer's prediction in its output: the output itself, or its first element (tuple, BaseOutput)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def with_primary_tensor(output, tensor: torch.Tensor):
    """`output` (the last computed one, for its structure) carrying `tensor` as its prediction."""
    if isinstance(output, torch.Tensor):
        return tensor
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    first = next(iter(output.keys()))
    return type(output)(**{**output, first: tensor})


@dataclass
class BranchStats:
    computed_steps: int = 0
    skipped_steps: int = 0
    schedule: str = ""
    """One letter per step: C computed, S forecast."""


@dataclass
class RequestPlan:
    """Shared by the backend and its hook: what the current request computes and how it forecasts the rest."""

    enabled: bool = True
    speedup: float = 3.0
    num_steps: int | None = None
    schedule: frozenset[int] = frozenset()
    weights: tuple[tuple[float, ...] | None, ...] = ()
    fitted: bool = False
    step_index: int | None = None
    """None: not driven by an engine; each branch counts its own calls."""
    branches: dict[str, BranchStats] = field(default_factory=dict)
    row_groups: tuple[str, ...] | None = None
    """The labels of the request's row groups in batched calls (`set_row_groups`); every group follows the same
    schedule and weights, so only their statistics are kept apart."""

    def branch_names(self, context: str) -> tuple[str, ...]:
        if self.row_groups is not None and context == ROWS_CONTEXT:
            return self.row_groups
        return (context,)


class ForecastState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.calls = 0
        self.history: list[torch.Tensor] = []
        """The branch's computed outputs, most recent last (at most the longest weight list)."""
        self.last_output: Any = None


class ForecastHook(ModelHook):
    """On the transformer: run it on the schedule's steps, forecast its output on the others."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, plan: RequestPlan):
        super().__init__()
        self.state_manager, self.plan = state_manager, plan

    def new_forward(self, module, *args, **kwargs):
        plan = self.plan
        if not plan.enabled:
            return self.fn_ref.original_forward(*args, **kwargs)
        state: ForecastState = self.state_manager.get_state()
        names = plan.branch_names(self.state_manager.context.name)
        stats = [plan.branches.setdefault(name, BranchStats()) for name in names]
        step = state.calls if plan.step_index is None else plan.step_index
        state.calls += 1
        weights = plan.weights[step] if plan.num_steps is not None and step < plan.num_steps else None
        if weights is None or not state.history:
            output = self.fn_ref.original_forward(*args, **kwargs)
            state.history = [*state.history, primary_tensor(output)][-MAX_HISTORY:]
            state.last_output = output
            for branch in stats:
                branch.computed_steps += 1
                branch.schedule += "C"
            return output
        history = state.history[::-1]  # most recent first, like the weights
        forecast = weights[0] * history[0]
        for weight, past in zip(weights[1:], history[1:], strict=False):  # early steps have a shorter history
            forecast = forecast + weight * past
        for branch in stats:
            branch.skipped_steps += 1
            branch.schedule += "S"
        return with_primary_tensor(state.last_output, forecast)

    def reset_state(self, module):
        self.state_manager.reset()
        return module


def _attach(
    transformer: torch.nn.Module, hook: ModelHook, name: str, state_manager: StateManager, target: CacheTarget
) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(hook, name)
    # Registered after (so around) the method's hook: it names the calls a pipeline makes outside cache_context.
    registry.register_hook(CallOrderBranches(state_manager, target), f"{name}_branches")


def _detach(transformer: torch.nn.Module, name: str) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for hook_name in (f"{name}_branches", name):
        registry.remove_hook(hook_name, recurse=False)


# -- the backend ---------------------------------------------------------------------------------------------------
class LearnedCacheBackend(CacheBackend):
    """`learned`: server settings are LearnedCacheConfig's fields; a request may set `enabled` and `speedup`."""

    name = NAME
    request_keys = REQUEST_KEYS
    request_checks = {"speedup": check_speedup}
    tuning_key = "speedup"
    tuning_values = (2.0, 4.0, 6.0, 7.5, 10.0)
    supports_row_groups = True

    def __init__(self) -> None:
        super().__init__()
        self.config = LearnedCacheConfig()
        self.plan = RequestPlan()
        self._transformer: torch.nn.Module | None = None

    @classmethod
    def calibrator(cls) -> ForecastCalibrator:
        return ForecastCalibrator()

    def configure_method(self, settings) -> None:
        self.config = parse_config(LearnedCacheConfig, settings, what=NAME)

    def apply(self, pipeline) -> None:
        transformer = only_transformer(pipeline, self.name)
        if HookRegistry.check_if_exists_or_initialize(transformer).get_hook(FORECAST_HOOK) is not None:
            raise ValueError("the learned cache is already applied to this transformer")
        state_manager = StateManager(ForecastState)
        _attach(
            transformer,
            ForecastHook(state_manager, self.plan),
            FORECAST_HOOK,
            state_manager,
            cache_target_for(transformer),
        )
        self._transformer = transformer

    def remove(self, pipeline) -> None:
        _detach(pipeline.transformer, FORECAST_HOOK)
        self._transformer = None

    def start_request(self, num_steps, overrides) -> None:
        plan = self.plan
        plan.enabled = overrides.get("enabled", True)
        plan.speedup = float(overrides.get("speedup", self.config.speedup))
        plan.num_steps, plan.step_index, plan.branches, plan.row_groups = num_steps, 0, {}, None
        plan.schedule, plan.weights = self.config.plan(num_steps, plan.speedup)
        plan.fitted = any(w is not None and w is not REUSE for w in plan.weights)
        if self._transformer is not None:  # a request that raised never reached the pipeline's own reset
            HookRegistry.check_if_exists_or_initialize(self._transformer).reset_stateful_hooks()

    def set_step(self, step_index: int) -> None:
        self.plan.step_index = step_index

    def set_row_groups(self, labels) -> None:
        self.plan.row_groups = tuple(label for label, _ in contiguous_groups(labels))

    def request_stats(self) -> dict[str, Any] | None:
        if self._transformer is None:
            return None
        plan = self.plan
        branches = {name: vars(stats).copy() for name, stats in plan.branches.items()}
        return {
            "backend": NAME,
            "enabled": plan.enabled,
            "speedup": plan.speedup,
            "forecast": "learned" if plan.fitted else "reuse",
            "num_steps": plan.num_steps,
            "computed_steps": sum(b["computed_steps"] for b in branches.values()),
            "skipped_steps": sum(b["skipped_steps"] for b in branches.values()),
            "branches": branches,
        }


# -- calibration ---------------------------------------------------------------------------------------------------
class RecordHook(ModelHook):
    """On the transformer: keep each branch's outputs of the current request (flattened, float32)."""

    def __init__(self, state_manager: StateManager, outputs: dict[str, list[torch.Tensor]]):
        super().__init__()
        self.state_manager, self.outputs = state_manager, outputs  # the state manager carries the branch name

    def post_forward(self, module, output):
        branch = self.state_manager.context.name
        self.outputs.setdefault(branch, []).append(primary_tensor(output).detach().float().reshape(-1))
        return output


class ForecastCalibrator(Calibrator):
    """Fits forecast weights from uncached runs: per step count, the Gram matrix of the outputs of every pair of
    steps (summed over requests and CFG branches), from which each schedule's least-squares weights follow.

    history: how many computed outputs a forecast combines (K). Every schedule of 2 up to all-but-one computed
    steps is fitted. `candidates()` are the fits for several schedule powers, which calibration compares by the
    PSNR they keep.
    """

    SCHEDULE_POWERS = (0.5, 0.6, 0.7, 0.85, 1.0)

    def __init__(self, history: int = 1, ridge: float = 1e-6):
        if not (isinstance(history, int) and 1 <= history <= MAX_HISTORY):
            raise ValueError(f"history must be an integer in [1, {MAX_HISTORY}], got {short_repr(history)}")
        self.history, self.ridge = history, ridge
        self.grams: dict[int, np.ndarray] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}
        self._state_manager = StateManager(ForecastState)
        self._transformer: torch.nn.Module | None = None

    def attach(self, transformer) -> None:
        _attach(
            transformer,
            RecordHook(self._state_manager, self._outputs),
            RECORD_HOOK,
            self._state_manager,
            cache_target_for(transformer),
        )
        self._transformer = transformer

    def detach(self) -> None:
        if self._transformer is not None:
            _detach(self._transformer, RECORD_HOOK)
            self._transformer = None

    def end_request(self, num_steps: int) -> None:
        recorded = dict(self._outputs)
        self._outputs.clear()
        for outputs in recorded.values():
            if len(outputs) != num_steps:  # a branch not called at every step (e.g. a CFG interval): no fit
                continue
            trajectory = torch.stack(outputs).double()
            gram = (trajectory @ trajectory.T).cpu().numpy()
            self.grams[num_steps] = self.grams.get(num_steps, 0) + gram

    def fit(self, schedule_power: float = DEFAULT_SCHEDULE_POWER) -> dict[str, Any]:
        if not self.grams:
            raise ValueError("nothing recorded: run the calibration prompts uncached with the calibrator attached")
        weights = {str(steps): self.fit_step_count(gram, schedule_power) for steps, gram in self.grams.items()}
        return {"schedule_power": schedule_power, "forecast_weights": weights}

    def candidates(self) -> dict[str, dict[str, Any]]:
        return {f"schedule_power {power:g}": self.fit(power) for power in self.SCHEDULE_POWERS}

    def fit_step_count(self, gram: np.ndarray, power: float) -> dict[str, list[list[float] | None]]:
        steps = len(gram)
        fitted: dict[str, list[list[float] | None]] = {}
        for count in range(2, steps):
            schedule = sorted(computed_steps(steps, count, power))
            entries: list[list[float] | None] = []
            for step in range(steps):
                if step in schedule:
                    entries.append(None)
                    continue
                past = [c for c in schedule if c < step][::-1][: self.history]
                entries.append(self.least_squares(gram, step, past))
            fitted[str(count)] = entries
        return fitted

    def least_squares(self, gram: np.ndarray, step: int, past: list[int]) -> list[float]:
        """Weights w minimising |output(step) - sum_k w_k output(past_k)|^2 over everything recorded."""
        a = gram[np.ix_(past, past)]
        a = a + self.ridge * np.trace(a) / len(past) * np.eye(len(past))
        weights = np.linalg.lstsq(a, gram[past, step], rcond=None)[0]  # the least-norm solution if singular
        return [float(np.clip(w, -MAX_WEIGHT, MAX_WEIGHT)) if math.isfinite(w) else 0.0 for w in weights]
