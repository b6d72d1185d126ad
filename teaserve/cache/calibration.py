"""Recording what cache methods are calibrated on, for any transformer with a registered cache target.

`record_gate_changes(transformer)` hooks the target's first and last blocks and records, per CFG branch and
step, the relative L1 change of the gate signal (exactly as TeaCache computes it) next to the relative L1 change
of the block stack's output. Run the pipeline uncached meanwhile (with a cache backend applied, pass
`{"enabled": false}` per request): a skipped step has no output of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .targets import ArgumentsHook, BlockIO, CacheTarget, CallOrderBranches, cache_target_for, relative_l1

HEAD_HOOK = "teaserve_calibration_head"
TAIL_HOOK = "teaserve_calibration_tail"
BRANCH_HOOK = "teaserve_calibration_branches"

Pair = tuple[float, float]


class RecorderState(BaseState):
    def __init__(self) -> None:
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.previous_gate: torch.Tensor | None = None
        self.previous_output: torch.Tensor | None = None
        self.gate_change: float | None = None


class GateRecorder:
    """(gate change, output change) pairs per branch, collected until `take()`."""

    def __init__(self, transformer: torch.nn.Module, target: CacheTarget | None = None):
        self.transformer = transformer
        self.target = target or cache_target_for(transformer)
        self.pairs: dict[str, list[Pair]] = {}
        blocks = self.target.block_stack(transformer)
        state_manager = StateManager(RecorderState)
        # With one block, the tail hook (registered last) wraps the head hook: the gate still comes first.
        head = _HeadHook(state_manager, self.target)
        HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(head, HEAD_HOOK)
        tail = _TailHook(state_manager, self, BlockIO.of(blocks[-1]))
        HookRegistry.check_if_exists_or_initialize(blocks[-1]).register_hook(tail, TAIL_HOOK)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(CallOrderBranches(state_manager, self.target), BRANCH_HOOK)
        registry.invalidate_child_registries_cache()

    def take(self) -> dict[str, list[Pair]]:
        """The pairs recorded so far, by branch; the recorder starts afresh."""
        pairs, self.pairs = self.pairs, {}
        return pairs

    def remove(self) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        for name in (BRANCH_HOOK, HEAD_HOOK, TAIL_HOOK):
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()


class _TailHook(ModelHook):
    """Last block: the output change, paired with the gate change the head hook found at this step."""

    def __init__(self, state_manager: StateManager, recorder: GateRecorder, io: BlockIO):
        super().__init__()
        self.state_manager, self.recorder, self.io = state_manager, recorder, io

    def post_forward(self, module, output):
        state: RecorderState = self.state_manager.get_state()
        hidden = self.io.split(output)[0].detach()
        previous, state.previous_output = state.previous_output, hidden
        if state.gate_change is not None and previous is not None and previous.shape == hidden.shape:
            pair = (state.gate_change, relative_l1(hidden, previous))
            self.recorder.pairs.setdefault(self.state_manager.context.name, []).append(pair)
        return output


class _HeadHook(ArgumentsHook):
    """First block: the gate change since the branch's previous step."""

    _is_stateful = True

    def __init__(self, state_manager: StateManager, target: CacheTarget):
        super().__init__()
        self.state_manager, self.target = state_manager, target

    def new_forward(self, module, *args, **kwargs):
        state: RecorderState = self.state_manager.get_state()
        gate = self.target.gate(module, self.arguments(args, kwargs)).detach()
        previous, state.previous_gate = state.previous_gate, gate
        state.gate_change = None if previous is None or previous.shape != gate.shape else relative_l1(gate, previous)
        return self.fn_ref.original_forward(*args, **kwargs)

    def reset_state(self, module):
        self.state_manager.reset()
        return module


@contextmanager
def record_gate_changes(transformer: torch.nn.Module, target: CacheTarget | None = None) -> Iterator[GateRecorder]:
    """Record (gate change, output change) pairs while inside; the hooks come off on leaving."""
    recorder = GateRecorder(transformer, target)
    try:
        yield recorder
    finally:
        recorder.remove()
