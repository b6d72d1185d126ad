"""Cache targets: what every cache method needs to know about a transformer, declared by its model's family.

A model family registers one `CacheTarget` per transformer class next to its own code, as diffusers registers
block metadata in `hooks/_helpers.py`; cache methods look the target up by the transformer's class (along its MRO)
and never name a model. This module also holds the block machinery the methods share: where a block's hidden
states sit in its arguments and outputs, the relative L1 change of a signal, the naming of CFG branches for
pipelines that call the transformer outside `cache_context`, and the backend base of the methods that are one of
diffusers' own caches put on a target's block stack (`DiffusersCacheBackend`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager, _set_cache_context

from .base import CacheBackend

Gate = Callable[[Any, dict[str, Any]], torch.Tensor]
"""(first block, its bound call arguments) -> the timestep-modulated input of that block."""
TimestepGate = Callable[[Any, torch.Tensor], torch.Tensor | None]
"""(transformer, the value of its step argument in a call) -> what `Gate` gives in that call, or None where that
value does not determine it."""

MAX_RELATIVE_CHANGE = 1e6
"""Relative changes are reported up to this (a non-finite change, from non-finite activations, counts as it)."""


@dataclass(frozen=True)
class StackShortcut:
    """The transformer's forward around its block stack, as two halves a cache method can run alone.

    enter(transformer, arguments) -> (hidden, temb): what the first block gets as `hidden_states` and `temb` for
        the call's arguments (by name), computed exactly as the forward computes them; None where the call needs
        the whole forward (e.g. a conditioning the shortcut does not cover).
    leave(transformer, hidden, temb, arguments) -> output: what the forward returns when the last block gives
        `hidden`, exactly as the forward computes it.
    The text stream, position embeddings and the blocks themselves are what a skipped step no longer runs.
    """

    enter: Callable[[Any, dict[str, Any]], tuple[torch.Tensor, torch.Tensor] | None]
    leave: Callable[[Any, torch.Tensor, torch.Tensor, dict[str, Any]], Any]


@dataclass(frozen=True)
class CacheTarget:
    """A transformer as cache methods see it.

    blocks: the block stack in call order; what a method may skip lies between the first block's input and the
        last block's output. Every block's class must be registered in diffusers' TransformerBlockRegistry.
    gate: the timestep-modulated input of the first block, computed from that block and its call arguments
        (TeaCache's signal).
    defaults: each cache method's recommended settings for this transformer, by backend name, e.g.
        `{"tea_cache": {"coefficients": (...)}}`, or a function of the transformer that returns them (for classes
        whose checkpoints differ, e.g. coefficients fitted per model size); server settings replace them.
    branch_names: pipelines that call the transformer outside `cache_context` get their CFG branches named by
        call order within a step: the i-th call of a step is `branch_names[i]` (later calls `branch<i>`).
    step_argument: the transformer's argument that changes from step to step and is shared by the calls of one
        step (the timestep); it tells where a step begins for such pipelines.
    shortcut: optional: how to run the transformer without its block stack, for methods that skip the whole stack
        (a skipped step then runs only what its output needs; see `StackShortcut`).
    timestep_gate: optional, for transformers whose gate depends on the step argument alone (the timestep
        embedding modulates the blocks): the gate computed from that argument, equal to what `gate` gives in a call
        with it. A method can then know the gate of every step of a request from its timesteps, before any step.
    """

    blocks: Callable[[Any], Iterable[torch.nn.Module]]
    gate: Gate
    defaults: Mapping[str, Mapping[str, Any]] | Callable[[Any], Mapping[str, Mapping[str, Any]]] = field(
        default_factory=dict
    )
    branch_names: tuple[str, ...] = ("cond", "uncond")
    step_argument: str = "timestep"
    shortcut: StackShortcut | None = None
    timestep_gate: TimestepGate | None = None

    def recommended(self, transformer: torch.nn.Module, backend: str) -> Mapping[str, Any]:
        """The settings this target recommends to `backend` for `transformer` (empty when none)."""
        defaults = self.defaults(transformer) if callable(self.defaults) else self.defaults
        return defaults.get(backend, {})

    def block_stack(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        blocks = list(self.blocks(transformer))
        if not blocks:
            raise ValueError(f"the cache target of {type(transformer).__name__} gives no blocks")
        return blocks


def denoising_transformers(pipeline) -> list[torch.nn.Module]:
    """The transformers a pipeline denoises with, in the order its steps use them: `transformer`, then
    `transformer_2` where the pipeline hands its low-noise steps to a second one (diffusers' convention)."""
    return [
        transformer
        for transformer in (getattr(pipeline, "transformer", None), getattr(pipeline, "transformer_2", None))
        if transformer is not None
    ]


def only_transformer(pipeline, method: str) -> torch.nn.Module:
    """The pipeline's transformer, for a method that hooks one; a ValueError where the pipeline has two."""
    transformers = denoising_transformers(pipeline)
    if len(transformers) != 1:
        raise ValueError(
            f"the {method} cache backend runs on one transformer, and this pipeline denoises with "
            f"{len(transformers)} (transformer for the high-noise steps, transformer_2 for the low-noise ones); "
            "use --cache-backend tea_cache, which hooks both, or none"
        )
    return transformers[0]


_TARGETS: dict[str, CacheTarget] = {}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_cache_target(transformer_class: type | str, target: CacheTarget) -> CacheTarget:
    """Declare `target` for `transformer_class` and its subclasses (a later registration replaces an earlier one).

    The class may be given by its qualified name ("package.module.Class"), so that registering imports nothing.
    """
    name = transformer_class if isinstance(transformer_class, str) else _qualified_name(transformer_class)
    _TARGETS[name] = target
    return target


def registered_transformers() -> list[str]:
    return sorted(name.rsplit(".", 1)[-1] for name in _TARGETS)


def cache_target_for(transformer: torch.nn.Module) -> CacheTarget:
    """The target registered for the transformer's class or the nearest base class that has one."""
    for cls in type(transformer).__mro__:
        target = _TARGETS.get(_qualified_name(cls))
        if target is not None:
            return target
    raise ValueError(
        f"no cache target is registered for transformer {type(transformer).__name__}; registered transformers: "
        f"{', '.join(registered_transformers()) or 'none'} (pass target=CacheTarget(...) for another one)"
    )


# -- block machinery shared by the methods ------------------------------------------------------------------------
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
        assert self.hidden_index is not None, "a block that returns a tuple registers where its hidden states are"
        encoder = output[self.encoder_index] if self.encoder_index is not None else None
        return output[self.hidden_index], encoder

    def join(self, hidden: torch.Tensor, encoder: torch.Tensor | None):
        if self.hidden_index is None or self.encoder_index is None:  # blocks that return their hidden states alone
            return hidden
        output: list[torch.Tensor | None] = [None, None]
        output[self.hidden_index] = hidden
        output[self.encoder_index] = encoder
        return tuple(output)


def bound_arguments(signature: inspect.Signature, args, kwargs) -> dict[str, Any]:
    """A call's arguments by name. Transformers call their blocks with keywords; binding (slow) is the fallback."""
    if not args:
        return kwargs
    return signature.bind_partial(None, *args, **kwargs).arguments


class ArgumentsHook(ModelHook):
    """A hook that reads its module's call arguments by name (`arguments`)."""

    _signature: inspect.Signature  # set when the hook is registered

    def initialize_hook(self, module):
        self._signature = inspect.signature(type(module).forward)
        return module

    def arguments(self, args, kwargs) -> dict[str, Any]:
        return bound_arguments(self._signature, args, kwargs)


@torch.compiler.disable
def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous|, finite: at most MAX_RELATIVE_CHANGE."""
    previous = previous.float()
    change = (current.float() - previous).abs().mean()
    value = (change / previous.abs().mean().clamp_min(1e-12)).item()
    return value if math.isfinite(value) and value <= MAX_RELATIVE_CHANGE else MAX_RELATIVE_CHANGE


@torch.compiler.disable
def relative_l1_of_rows(current: torch.Tensor, previous: torch.Tensor, groups: list[slice]) -> list[float]:
    """`relative_l1` of each group of rows (a slice of the first dimension), in one pass and one device sync."""
    if len(groups) == 1:
        return [relative_l1(current[groups[0]], previous[groups[0]])]
    previous = previous.float()
    change = (current.float() - previous).abs().flatten(1).sum(1)
    size = previous.abs().flatten(1).sum(1)
    values = torch.stack([change[rows].sum() / size[rows].sum().clamp_min(1e-12) for rows in groups]).tolist()
    return [value if math.isfinite(value) and value <= MAX_RELATIVE_CHANGE else MAX_RELATIVE_CHANGE for value in values]


def context_is_set(state_manager: StateManager) -> bool:
    try:
        return state_manager.context is not None
    except ValueError:  # StateManager's way of saying that no context is set
        return False


class CallOrderBranches(ArgumentsHook):
    """On the transformer: names the calls a pipeline makes outside `cache_context` by their order in the step.

    Some pipelines (diffusers 0.42's FluxKontextPipeline) call the transformer for the conditional and then the
    unconditional branch without naming them; calls that share the value of the target's step argument belong to
    one step, so the i-th of them is the target's i-th branch name. Calls inside a pipeline's own `cache_context`
    are left alone. `state_manager` is the method's: its context says whether the pipeline named the call.

    It works before and after the call (no forward of its own): diffusers 0.42 relinks a hook with its own forward
    wrongly when a hook registered before it is removed, which would leave that removed hook in the call chain.
    """

    _is_stateful = True  # reset with the method's state after each pipeline call

    def __init__(self, state_manager: StateManager, target: CacheTarget):
        super().__init__()
        self.state_manager, self.target = state_manager, target
        self._step: float | None = None
        self._calls = 0
        self._named: CacheContext | None = None
        """The context this hook set for the call under way."""

    def reset_state(self, module):
        self._step, self._calls, self._named = None, 0, None
        return module

    def _step_value(self, args, kwargs) -> float | None:
        value = self.arguments(args, kwargs).get(self.target.step_argument)
        if isinstance(value, torch.Tensor):
            return float(value.reshape(-1)[0]) if value.numel() else None
        return float(value) if isinstance(value, int | float) else None

    def pre_forward(self, module, *args, **kwargs):
        # A context of this hook's own still set is from a call that raised: this call is unnamed as well.
        own, self._named = self._named, None
        if context_is_set(self.state_manager) and self.state_manager.context is not own:
            return args, kwargs
        step = self._step_value(args, kwargs)
        if step is None or step != self._step:
            self._step, self._calls = step, 0
        names = self.target.branch_names
        name = names[self._calls] if self._calls < len(names) else f"branch{self._calls}"
        self._calls += 1
        self._named = CacheContext(name)
        _set_cache_context(module, self._named)
        return args, kwargs

    def post_forward(self, module, output):
        if self._named is not None:
            _set_cache_context(module, None)
            self._named = None
        return output


# -- diffusers' caches on a target's block stack -------------------------------------------------------------------
CALLS_HOOK = "teaserve_stack_calls"
BLOCK_HOOK = "teaserve_stack_block"
BRANCH_HOOK = "teaserve_stack_branches"
STACK_NAME = "blocks"
"""The name under which `apply_*` functions see the block stack: its blocks are `blocks.0`, `blocks.1`, ..."""

ApplyCache = Callable[[torch.nn.Module, Any], None]
"""One of diffusers' `apply_*_cache(module, config)` functions."""


@dataclass
class StackCall:
    """What ran of the block stack during the transformer call under way."""

    blocks: int = 0
    last_block: bool = False


@dataclass
class StackBranchStats:
    """What ran of the block stack in one CFG branch during one request."""

    computed_steps: int = 0
    skipped_steps: int = 0
    schedule: str = ""
    """One letter per step: C the last block ran (the stack was computed), S it did not."""
    block_evaluations: int = 0
    """Blocks that ran, skipped steps included (First Block Cache computes the first block at every step)."""


class _BlockRan(ModelHook):
    """Innermost hook of a block: counts the block's runs (a cache's hooks around it may return without a call)."""

    def __init__(self, call: StackCall, is_last: bool):
        super().__init__()
        self.call, self.is_last = call, is_last

    def new_forward(self, module, *args, **kwargs):
        self.call.blocks += 1
        self.call.last_block = self.call.last_block or self.is_last
        return self.fn_ref.original_forward(*args, **kwargs)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _TransformerCalls(ModelHook):
    """On the transformer: after each call, files under the call's branch what ran of the block stack."""

    _is_stateful = True  # so that the branch of each call (its cache context) is set on `state_manager`

    def __init__(self, call: StackCall, branches: dict[str, StackBranchStats]):
        super().__init__()
        self.call, self.branches = call, branches
        self.state_manager = StateManager(_NoState)

    def new_forward(self, module, *args, **kwargs):
        # The name is read before the call: a hook inside may clear the context when it returns.
        name = self.state_manager.context.name
        self.call.blocks, self.call.last_block = 0, False
        output = self.fn_ref.original_forward(*args, **kwargs)
        stats = self.branches.setdefault(name, StackBranchStats())
        stats.block_evaluations += self.call.blocks
        if self.call.last_block:
            stats.computed_steps += 1
            stats.schedule += "C"
        else:
            stats.skipped_steps += 1
            stats.schedule += "S"
        return output

    def reset_state(self, module):
        self.state_manager.reset()
        return module


class BlockStackCache:
    """One of diffusers' caches on the block stack of a transformer's cache target, and what it skipped.

    diffusers' `apply_*` functions find blocks by attribute name; here they are handed the target's block stack
    itself, as the list `blocks` of a holder module, so they hook exactly the blocks the target declares. `use`
    puts the hooks of given settings in place for the next request (re-applying them only when the settings
    change) or takes them off. diffusers' hooks report nothing, so the stack's own hooks observe, per call of the
    transformer, which blocks actually ran: `branches` holds the statistics per CFG branch. Calls outside
    `cache_context` are named by their order in the step (`CallOrderBranches`), for diffusers' hooks as for the
    statistics.
    """

    def __init__(self, transformer: torch.nn.Module, target: CacheTarget):
        self.transformer = transformer
        self.blocks = target.block_stack(transformer)
        self.block_names = [f"{STACK_NAME}.{index}" for index in range(len(self.blocks))]
        """The blocks' names as the `apply_*` functions see them."""
        self.branches: dict[str, StackBranchStats] = {}
        self.settings: dict[str, Any] | None = None
        """The settings of the cache hooks in place; None when there are none."""
        self._added: list[tuple[torch.nn.Module, str]] = []
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        if registry.get_hook(CALLS_HOOK) is not None:
            raise ValueError("a cache backend is already applied to this transformer; remove it first")
        call = StackCall()
        # Registered before any cache hook, so that a hook which skips a block never reaches its counter.
        for index, block in enumerate(self.blocks):
            marker = _BlockRan(call, is_last=index == len(self.blocks) - 1)
            HookRegistry.check_if_exists_or_initialize(block).register_hook(marker, BLOCK_HOOK)
        calls = _TransformerCalls(call, self.branches)
        registry.register_hook(calls, CALLS_HOOK)
        registry.register_hook(CallOrderBranches(calls.state_manager, target), BRANCH_HOOK)
        registry.invalidate_child_registries_cache()

    def use(self, settings: dict[str, Any] | None, cache: Callable[[dict[str, Any]], tuple[ApplyCache, Any]]) -> None:
        """Prepare the next request: the hooks that `cache(settings)` gives (apply function, config), or none
        (every block computed), with every branch's state and statistics reset."""
        if settings != self.settings:
            self._take_off()
            if settings is not None:
                apply, config = cache(settings)
                self._put_on(apply, config)
            self.settings = settings
        # A request that raised never reached the pipeline's own reset of the hooks' state.
        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks()
        self.branches.clear()

    def _put_on(self, apply: ApplyCache, config: Any) -> None:
        holder = torch.nn.Module()
        holder.add_module(STACK_NAME, torch.nn.ModuleList(self.blocks))
        before = [set(HookRegistry.check_if_exists_or_initialize(block).hooks) for block in self.blocks]
        try:
            apply(holder, config)
        finally:
            for block, names in zip(self.blocks, before, strict=True):
                hooks = HookRegistry.check_if_exists_or_initialize(block).hooks  # in the order they were registered
                self._added += [(block, name) for name in hooks if name not in names]
            # New hooks below the transformer stale its cached list of child registries.
            HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    def _take_off(self) -> None:
        # Outermost first: diffusers 0.42 relinks the hook above a removed one wrongly when that hook has its own
        # forward (it replaces that forward instead of what it calls).
        for block, name in reversed(self._added):
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(name, recurse=False)
        self._added = []
        self.settings = None
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    def remove(self) -> None:
        """Take every hook off: the transformer computes every block again."""
        self._take_off()
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(BLOCK_HOOK, recurse=False)
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        for name in (BRANCH_HOOK, CALLS_HOOK):
            registry.remove_hook(name, recurse=False)
        registry.invalidate_child_registries_cache()


class DiffusersCacheBackend(CacheBackend):
    """A backend that is one of diffusers' caches on the block stack of the transformer's cache target.

    A subclass says which of its settings are in force for a request (`request_settings`, a dict of plain
    values) and which diffusers hooks they make (`diffusers_cache`); the hooks are re-applied only when the
    settings change. `{"enabled": false}` takes them off for the request, so every block is computed: exactly the
    uncached output. Statistics are observed (did the last block run?), the same for every such method.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stack: BlockStackCache | None = None
        self._enabled = True
        self._num_steps: int | None = None
        self._request: dict[str, Any] = {}

    def check_transformer(self, transformer: torch.nn.Module, target: CacheTarget) -> None:
        """Refuse (ValueError) a transformer the method cannot run on; called by `apply` before any hook."""

    @abstractmethod
    def request_settings(self, num_steps: int, overrides: dict[str, Any]) -> dict[str, Any]:
        """The method's settings for a request of `num_steps` steps: the server's with `overrides` on top."""

    @abstractmethod
    def diffusers_cache(self, settings: dict[str, Any]) -> tuple[ApplyCache, Any]:
        """diffusers' apply function and its config for `settings`."""

    @property
    def block_names(self) -> list[str]:
        """The names under which diffusers' `apply_*` functions see the blocks (the backend is applied)."""
        assert self._stack is not None, "apply() the backend first"
        return self._stack.block_names

    def apply(self, pipeline) -> None:
        transformer = only_transformer(pipeline, self.name)
        target = cache_target_for(transformer)
        self.check_transformer(transformer, target)
        self._stack = BlockStackCache(transformer, target)

    def remove(self, pipeline) -> None:
        if self._stack is not None:
            self._stack.remove()
            self._stack = None

    def start_request(self, num_steps, overrides) -> None:
        self._enabled = overrides.get("enabled", True)
        self._num_steps = num_steps
        self._request = self.request_settings(num_steps, overrides)
        if self._stack is not None:
            self._stack.use(self._request if self._enabled else None, self.diffusers_cache)

    def request_stats(self) -> dict[str, Any] | None:
        if self._stack is None:
            return None
        branches = {name: dataclasses.asdict(stats) for name, stats in self._stack.branches.items()}
        return {
            "backend": self.name,
            "enabled": self._enabled,
            "num_steps": self._num_steps,
            "computed_steps": sum(branch["computed_steps"] for branch in branches.values()),
            "skipped_steps": sum(branch["skipped_steps"] for branch in branches.values()),
            "block_evaluations": sum(branch["block_evaluations"] for branch in branches.values()),
            "num_blocks": len(self._stack.blocks),
            **{key: self._request[key] for key in self.request_keys if key in self._request},
            "branches": branches,
        }
