"""Cache targets: what every cache method needs to know about a transformer, declared by its model's family.

A model family registers one `CacheTarget` per transformer class next to its own code, as diffusers registers
block metadata in `hooks/_helpers.py`; cache methods look the target up by the transformer's class (along its MRO)
and never name a model. This module also holds the block machinery the methods share: where a block's hidden
states sit in its arguments and outputs, the relative L1 change of a signal, and the naming of CFG branches for
pipelines that call the transformer outside `cache_context`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context

Gate = Callable[[Any, dict[str, Any]], torch.Tensor]
"""(first block, its bound call arguments) -> the timestep-modulated input of that block."""

MAX_RELATIVE_CHANGE = 1e6
"""Relative changes are reported up to this (a non-finite change, from non-finite activations, counts as it)."""


@dataclass(frozen=True)
class CacheTarget:
    """A transformer as cache methods see it.

    blocks: the block stack in call order; what a method may skip lies between the first block's input and the
        last block's output. Every block's class must be registered in diffusers' TransformerBlockRegistry.
    gate: the timestep-modulated input of the first block, computed from that block and its call arguments
        (TeaCache's signal).
    defaults: each cache method's recommended settings for this transformer, by backend name, e.g.
        `{"tea_cache": {"coefficients": (...)}}`; server settings replace them.
    branch_names: pipelines that call the transformer outside `cache_context` get their CFG branches named by
        call order within a step: the i-th call of a step is `branch_names[i]` (later calls `branch<i>`).
    step_argument: the transformer's argument that changes from step to step and is shared by the calls of one
        step (the timestep); it tells where a step begins for such pipelines.
    """

    blocks: Callable[[Any], Iterable[torch.nn.Module]]
    gate: Gate
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    branch_names: tuple[str, ...] = ("cond", "uncond")
    step_argument: str = "timestep"

    def block_stack(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        blocks = list(self.blocks(transformer))
        if not blocks:
            raise ValueError(f"the cache target of {type(transformer).__name__} gives no blocks")
        return blocks


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
        if self.hidden_index is None:
            return hidden
        output: list[torch.Tensor | None] = [None] * (1 + (self.encoder_index is not None))
        output[self.hidden_index] = hidden
        if self.encoder_index is not None:
            output[self.encoder_index] = encoder
        return tuple(output)


def bound_arguments(signature: inspect.Signature, args, kwargs) -> dict[str, Any]:
    """A call's arguments by name. Transformers call their blocks with keywords; binding (slow) is the fallback."""
    if not args:
        return kwargs
    return signature.bind_partial(None, *args, **kwargs).arguments


@torch.compiler.disable
def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean|current - previous| / mean|previous|, finite: at most MAX_RELATIVE_CHANGE."""
    previous = previous.float()
    change = (current.float() - previous).abs().mean()
    value = (change / previous.abs().mean().clamp_min(1e-12)).item()
    return value if math.isfinite(value) and value <= MAX_RELATIVE_CHANGE else MAX_RELATIVE_CHANGE


def context_is_set(state_manager: StateManager) -> bool:
    try:
        return state_manager.context is not None
    except ValueError:  # StateManager's way of saying that no context is set
        return False


class CallOrderBranches(ModelHook):
    """On the transformer: names the calls a pipeline makes outside `cache_context` by their order in the step.

    Some pipelines (diffusers 0.42's FluxKontextPipeline) call the transformer for the conditional and then the
    unconditional branch without naming them; calls that share the value of the target's step argument belong to
    one step, so the i-th of them is the target's i-th branch name. Calls inside a pipeline's own `cache_context`
    are left alone. `state_manager` is the method's: its context says whether the pipeline named the call.
    """

    _is_stateful = True  # reset with the method's state after each pipeline call

    _signature: inspect.Signature  # set when the hook is registered

    def __init__(self, state_manager: StateManager, target: CacheTarget):
        super().__init__()
        self.state_manager, self.target = state_manager, target
        self._step: float | None = None
        self._calls = 0

    def initialize_hook(self, module):
        self._signature = inspect.signature(type(module).forward)
        return module

    def reset_state(self, module):
        self._step, self._calls = None, 0
        return module

    def _step_value(self, args, kwargs) -> float | None:
        value = bound_arguments(self._signature, args, kwargs).get(self.target.step_argument)
        if isinstance(value, torch.Tensor):
            return float(value.reshape(-1)[0]) if value.numel() else None
        return float(value) if isinstance(value, int | float) else None

    def new_forward(self, module, *args, **kwargs):
        if context_is_set(self.state_manager):
            return self.fn_ref.original_forward(*args, **kwargs)
        step = self._step_value(args, kwargs)
        if step is None or step != self._step:
            self._step, self._calls = step, 0
        names = self.target.branch_names
        name = names[self._calls] if self._calls < len(names) else f"branch{self._calls}"
        self._calls += 1
        _set_cache_context(module, CacheContext(name))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _set_cache_context(module, None)
