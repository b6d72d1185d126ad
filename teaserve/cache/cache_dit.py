"""cache-dit's DBCache (optionally with its TaylorSeer calibrator) through cache-dit's public API.

DBCache ("Dual Block Cache", vipshop/cache-dit) always runs the first `Fn_compute_blocks` blocks of the stack,
compares their residual with the one of the last computed step (relative L1), and while the change stays below
`residual_diff_threshold` it skips the middle blocks, adding their cached residual (or a TaylorSeer forecast of
it); the last `Bn_compute_blocks` blocks always run. cache-dit is an optional extra: `pip install
'teaserve[cache-dit]'`.

It is applied transformer-only, with a `cache_dit.BlockAdapter` built from the transformer's registered
`CacheTarget`: the block stack must be made of the transformer's own block lists (ModuleList attributes that its
forward iterates), and the forward pattern of each list comes from diffusers' block metadata.

CFG branches. cache-dit tells them apart by call parity (even calls conditional, odd ones unconditional), which
holds only when every step has both. Whether a request has them is known once a branch name repeats: the first
step is therefore computed in full, then the cache context is refreshed with `enable_separate_cfg` set from the
branches seen, and DBCache runs from the second step on (which, with no residual to compare yet, it computes).
Branch names come from the pipeline's `cache_context` (or, for pipelines without one, from call order).

Statistics come from watching the blocks: a call whose every block ran is a computed step, any other a skipped one.
"""

from __future__ import annotations

import inspect
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from .base import CacheBackend, is_number, parse_config, short_repr
from .targets import (
    BlockIO,
    CacheTarget,
    CallOrderBranches,
    StackBranchStats,
    cache_target_for,
    context_is_set,
    only_transformer,
)

NAME = "cache_dit"
INSTALL_HINT = "pip install 'teaserve[cache-dit]'"
CALLS_HOOK = "teaserve_cache_dit_calls"
BRANCH_HOOK = "teaserve_cache_dit_branches"
CACHE_DIT_LOGGER = "CACHE_DIT"
"""The logger whose console handler all of cache-dit's loggers share."""

MAX_STEP_COUNT = 10_000
MAX_BLOCK_COUNT = 1_000
MAX_TAYLORSEER_ORDER = 4
MAX_CFG_BRANCHES = 2
"""cache-dit keeps apart a conditional and an unconditional branch, no more."""


def import_cache_dit():
    """The cache_dit module, or a ValueError that says how to install it."""
    try:
        import cache_dit
    except ImportError as error:
        raise ValueError(
            f"the {NAME} cache backend needs the cache-dit package, which is not installed ({error}): {INSTALL_HINT}"
        ) from None
    # cache-dit logs to stdout, where the CLI and the benchmarks write their results: its lines go to stderr.
    for handler in logging.getLogger(CACHE_DIT_LOGGER).handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(sys.stderr)
    return cache_dit


def check_threshold(value: Any) -> float:
    # cache-dit caches unconditionally from 1.0 on, so larger values would all mean the same.
    if not is_number(value) or not 0 < value <= 1:
        raise ValueError(
            f"residual_diff_threshold must be a number in (0, 1] (1 reuses the cache whenever allowed), "
            f"got {short_repr(value)}"
        )
    return float(value)


def _check_count(name: str, value: Any, low: int, high: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        unlimited = " (or null for unlimited)" if optional else ""
        raise ValueError(f"{name} must be an integer in [{low}, {high}]{unlimited}, got {short_repr(value)}")


@dataclass(frozen=True)
class CacheDiTConfig:
    """DBCache settings (cache-dit's names, as vLLM-Omni's cache_config uses them).

    residual_diff_threshold: reuse the cache while the relative L1 change of the first blocks' residual stays below
        this (larger = faster), in (0, 1].
    Fn_compute_blocks: first blocks computed at every step (their residual is the gate signal), at least 1.
    Bn_compute_blocks: last blocks computed at every step.
    max_warmup_steps: steps computed in full at the start of a request (the first two always are).
    max_cached_steps: at most this many skipped steps per branch and request; None = unlimited.
    max_continuous_cached_steps: at most this many skipped steps in a row; None = unlimited.
    enable_taylorseer: forecast the skipped blocks' residual with TaylorSeer instead of reusing it. Its forecast
        needs four computed steps after the first (before, it reuses): keep max_warmup_steps at 5 or more with it.
    taylorseer_order: the order of the TaylorSeer forecast, 1 to 4.
    """

    residual_diff_threshold: float = 0.2
    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    max_warmup_steps: int = 4
    max_cached_steps: int | None = None
    max_continuous_cached_steps: int | None = None
    enable_taylorseer: bool = False
    taylorseer_order: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "residual_diff_threshold", check_threshold(self.residual_diff_threshold))
        _check_count("Fn_compute_blocks", self.Fn_compute_blocks, 1, MAX_BLOCK_COUNT)
        _check_count("Bn_compute_blocks", self.Bn_compute_blocks, 0, MAX_BLOCK_COUNT)
        _check_count("max_warmup_steps", self.max_warmup_steps, 0, MAX_STEP_COUNT)
        _check_count("max_cached_steps", self.max_cached_steps, 0, MAX_STEP_COUNT, optional=True)
        _check_count("max_continuous_cached_steps", self.max_continuous_cached_steps, 0, MAX_STEP_COUNT, optional=True)
        if not isinstance(self.enable_taylorseer, bool):
            raise ValueError(f"enable_taylorseer must be true or false, got {short_repr(self.enable_taylorseer)}")
        _check_count("taylorseer_order", self.taylorseer_order, 1, MAX_TAYLORSEER_ORDER)


# -- the adapter: the target's block stack as cache-dit's block lists -----------------------------------------------
@dataclass(frozen=True)
class BlockList:
    """One block list of the stack: the transformer's attribute holding it, and cache-dit's forward pattern."""

    name: str
    blocks: torch.nn.ModuleList
    pattern: str
    """A cache_dit.ForwardPattern member name."""


def _unsupported(transformer: torch.nn.Module, why: str) -> ValueError:
    return ValueError(
        f"the {NAME} cache backend cannot cache {type(transformer).__name__}: {why}. cache-dit swaps the block lists "
        "that a transformer's forward iterates (ModuleList attributes such as transformer_blocks) and calls their "
        "blocks with hidden_states (and encoder_hidden_states) first; use another cache backend for this model"
    )


def forward_pattern(transformer: torch.nn.Module, block: torch.nn.Module) -> str:
    """cache-dit's ForwardPattern for a block, from where diffusers' block metadata puts its hidden states."""
    try:
        io = BlockIO.of(block)
    except ValueError:
        raise _unsupported(transformer, f"its block {type(block).__name__} has no diffusers block metadata") from None
    parameters = list(inspect.signature(type(block).forward).parameters)[1:]
    takes_encoder = parameters[1:2] == [io.encoder_argument]
    # Pattern_0..2 take (hidden, encoder); Pattern_3..5 take hidden only. Outputs: hidden only, (hidden, encoder)
    # or (encoder, hidden).
    outputs = {(None, None): (2, 3), (0, 1): (0, 4), (1, 0): (1, 5)}.get((io.hidden_index, io.encoder_index))
    if parameters[:1] != ["hidden_states"] or io.encoder_argument != "encoder_hidden_states" or outputs is None:
        raise _unsupported(transformer, f"its block {type(block).__name__} has another call signature")
    return f"Pattern_{outputs[0] if takes_encoder else outputs[1]}"


def block_lists(transformer: torch.nn.Module, target: CacheTarget) -> list[BlockList]:
    """The target's block stack as consecutive ModuleList attributes of the transformer, else a ValueError."""
    stack = target.block_stack(transformer)
    candidates = [
        (name, child) for name, child in transformer.named_children() if isinstance(child, torch.nn.ModuleList)
    ]
    found: list[BlockList] = []
    position = 0
    while position < len(stack):
        for name, blocks in candidates:
            span = stack[position : position + len(blocks)]
            if len(blocks) and len(span) == len(blocks) and all(a is b for a, b in zip(span, blocks, strict=True)):
                found.append(BlockList(name, blocks, forward_pattern(transformer, blocks[0])))
                position += len(blocks)
                break
        else:
            raise _unsupported(transformer, "its block stack is not made of its own block lists")
    return found


def check_block_counts(config: CacheDiTConfig, lists: list[BlockList]) -> None:
    shortest = min(len(block_list.blocks) for block_list in lists)
    if config.Fn_compute_blocks + config.Bn_compute_blocks > shortest:
        raise ValueError(
            f"Fn_compute_blocks + Bn_compute_blocks ({config.Fn_compute_blocks} + {config.Bn_compute_blocks}) must "
            f"be at most {shortest}, the length of this transformer's shortest block list"
        )


# -- what happened in a request -----------------------------------------------------------------------------------
@dataclass
class Request:
    """The settings and the progress of the current request."""

    threshold: float
    enabled: bool = True
    num_steps: int | None = None
    fresh: bool = True
    """The next transformer call begins the request: compute in full until the branches are known."""
    probing: bool = True
    """Still in the first step, computed in full while its branches are counted."""
    branch_order: list[str] = field(default_factory=list)
    """Branch names of the first step, in call order."""
    branches: dict[str, StackBranchStats] = field(default_factory=dict)


class CallState(BaseState):
    """Nothing per branch: the hook is stateful only to learn the name of each call's `cache_context`."""

    def reset(self, *args, **kwargs) -> None:
        pass


class CallObserver(ModelHook):
    """On the transformer, around cache-dit's forward: names each call's branch, refreshes cache-dit's context when
    the branches become known, and counts the blocks that ran."""

    _is_stateful = True

    def __init__(self, cache: CacheDiT):
        super().__init__()
        self.cache = cache
        self.state_manager = StateManager(CallState)

    def new_forward(self, module, *args, **kwargs):
        branch = self.state_manager.context.name if context_is_set(self.state_manager) else "cond"
        cache = self.cache
        cache.before_call(branch)
        before = cache.block_evaluations
        output = self.fn_ref.original_forward(*args, **kwargs)
        cache.after_call(branch, cache.block_evaluations - before)
        return output

    def reset_state(self, module):
        # The pipeline call ended (diffusers resets stateful hooks then): the next call begins a request.
        self.cache.request.fresh = True
        return module


def _limit(value: int | None) -> int:
    return -1 if value is None else value  # cache-dit's "unlimited"


class CacheDiT:
    """cache-dit's DBCache on one transformer, driven request by request; `remove()` takes it off."""

    def __init__(self, transformer: torch.nn.Module, config: CacheDiTConfig, target: CacheTarget):
        self.cache_dit = import_cache_dit()
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        # `_is_cached` is how cache-dit marks a transformer it caches, whoever applied it.
        if registry.get_hook(CALLS_HOOK) is not None or getattr(transformer, "_is_cached", False):
            raise ValueError("cache-dit is already applied to this transformer; remove it first")
        if registry.hooks:  # cache-dit rebinds the transformer's forward, which diffusers' hooks have replaced
            raise ValueError(
                f"cache-dit cannot share a transformer with other hooks on its forward ({', '.join(registry.hooks)}): "
                "remove the other cache method or calibration first"
            )
        self.transformer, self.config = transformer, config
        self.lists = block_lists(transformer, target)
        check_block_counts(config, self.lists)
        self.num_blocks = sum(len(block_list.blocks) for block_list in self.lists)
        self.request = Request(config.residual_diff_threshold)
        self.block_evaluations = 0

        patterns = self.cache_dit.ForwardPattern
        adapter = self.cache_dit.BlockAdapter(
            transformer=transformer,
            blocks=[block_list.blocks for block_list in self.lists],
            blocks_name=[block_list.name for block_list in self.lists],
            forward_pattern=[getattr(patterns, block_list.pattern) for block_list in self.lists],
        )
        self.cache_dit.enable_cache(adapter, **self._context_settings(separate_cfg=False, full=True))
        self._block_hooks = [
            block.register_forward_pre_hook(self._count_block)
            for block_list in self.lists
            for block in block_list.blocks
        ]
        observer = CallObserver(self)
        registry.register_hook(observer, CALLS_HOOK)
        # Outside the observer: names the calls of pipelines that do not, before the observer reads the name.
        registry.register_hook(CallOrderBranches(observer.state_manager, target), BRANCH_HOOK)
        registry.invalidate_child_registries_cache()

    def _count_block(self, module, args) -> None:
        self.block_evaluations += 1

    def _context_settings(self, *, separate_cfg: bool, full: bool) -> dict[str, Any]:
        """cache-dit's cache and calibrator configs: DBCache from the request's second step on, or (`full`) every
        block computed. Every field is explicit: a refresh keeps the old value of a field given as None."""
        config = self.config
        cache_config = self.cache_dit.DBCacheConfig(
            Fn_compute_blocks=config.Fn_compute_blocks,
            Bn_compute_blocks=config.Bn_compute_blocks,
            residual_diff_threshold=self.request.threshold,
            # The context starts at the request's second step: its step numbers are one less.
            max_warmup_steps=max(config.max_warmup_steps - 1, 0),
            warmup_interval=1,
            max_cached_steps=0 if full else _limit(config.max_cached_steps),
            max_continuous_cached_steps=_limit(config.max_continuous_cached_steps),
            enable_separate_cfg=separate_cfg,
            cfg_compute_first=False,
            cfg_diff_compute_separate=True,
        )
        calibrator_config = self.cache_dit.TaylorSeerCalibratorConfig(
            enable_calibrator=config.enable_taylorseer,
            enable_encoder_calibrator=config.enable_taylorseer,
            taylorseer_order=config.taylorseer_order,
        )
        return {"cache_config": cache_config, "calibrator_config": calibrator_config}

    def _refresh(self, *, separate_cfg: bool, full: bool) -> None:
        self.cache_dit.refresh_context(self.transformer, **self._context_settings(separate_cfg=separate_cfg, full=full))

    # -- per call --------------------------------------------------------------------------------------------------
    def before_call(self, branch: str) -> None:
        request = self.request
        if request.fresh:
            request.fresh, request.probing, request.branch_order, request.branches = False, True, [], {}
            self._refresh(separate_cfg=False, full=True)
        if not request.probing:
            return
        if branch not in request.branch_order:
            request.branch_order.append(branch)
            return
        # The first step is over: its branches are known.
        request.probing = False
        if not request.enabled:
            return
        if len(request.branch_order) > MAX_CFG_BRANCHES:
            raise ValueError(
                f"the {NAME} cache backend keeps at most {MAX_CFG_BRANCHES} CFG branches apart, this pipeline calls "
                f"the transformer {len(request.branch_order)} times per step ({', '.join(request.branch_order)})"
            )
        self._refresh(separate_cfg=len(request.branch_order) == MAX_CFG_BRANCHES, full=False)

    def after_call(self, branch: str, evaluations: int) -> None:
        stats = self.request.branches.setdefault(branch, StackBranchStats())
        stats.block_evaluations += evaluations
        if evaluations >= self.num_blocks:
            stats.computed_steps += 1
            stats.schedule += "C"
        else:
            stats.skipped_steps += 1
            stats.schedule += "S"

    # -- per request -----------------------------------------------------------------------------------------------
    def configure(self, config: CacheDiTConfig) -> None:
        """New settings from the next request on (block counts that do not fit raise and change nothing)."""
        check_block_counts(config, self.lists)
        self.config = config
        self.request = Request(config.residual_diff_threshold)

    def begin_request(self, num_steps: int | None, overrides: dict[str, Any] | None = None) -> None:
        overrides = overrides or {}
        self.request = Request(
            threshold=overrides.get("residual_diff_threshold", self.config.residual_diff_threshold),
            enabled=overrides.get("enabled", True),
            num_steps=num_steps,
        )

    def stats(self) -> dict[str, Any]:
        request = self.request
        branches = {name: asdict(stats) for name, stats in request.branches.items()}
        return {
            "backend": NAME,
            "enabled": request.enabled,
            "residual_diff_threshold": request.threshold,
            "num_steps": request.num_steps,
            "computed_steps": sum(b["computed_steps"] for b in branches.values()),
            "skipped_steps": sum(b["skipped_steps"] for b in branches.values()),
            "block_evaluations": sum(b["block_evaluations"] for b in branches.values()),
            "num_blocks": self.num_blocks,
            "branches": branches,
        }

    def remove(self) -> None:
        """Take the hooks and cache-dit off: the transformer computes every block again."""
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        for name in (BRANCH_HOOK, CALLS_HOOK):
            registry.remove_hook(name, recurse=False)
        for handle in self._block_hooks:
            handle.remove()
        self.cache_dit.disable_cache(self.transformer)
        # cache-dit leaves the original forward bound on the instance: let the class's forward show through again.
        forward = self.transformer.__dict__.get("forward")
        if getattr(forward, "__func__", None) is type(self.transformer).forward:
            del self.transformer.forward


def apply_cache_dit(
    transformer: torch.nn.Module, config: CacheDiTConfig | None = None, *, target: CacheTarget | None = None
) -> CacheDiT:
    """Attach cache-dit's DBCache to `transformer` (a diffusers pipeline's `pipe.transformer`); call
    `begin_request(num_steps, overrides)` before each pipeline call to change per-request settings."""
    return CacheDiT(transformer, config or CacheDiTConfig(), target or cache_target_for(transformer))


# -- the backend -------------------------------------------------------------------------------------------------
class CacheDiTBackend(CacheBackend):
    """`cache_dit`: server settings are CacheDiTConfig's fields; a request may set `enabled` and
    `residual_diff_threshold`. Needs the optional cache-dit package."""

    name = NAME
    request_keys = ("enabled", "residual_diff_threshold")
    request_checks = {"residual_diff_threshold": check_threshold}
    tuning_key = "residual_diff_threshold"
    tuning_values = (0.12, 0.2, 0.3, 0.5, 0.8)

    def __init__(self) -> None:
        super().__init__()
        import_cache_dit()  # selecting the backend without the package fails here, with the way to install it
        self.config = CacheDiTConfig()
        self._cache: CacheDiT | None = None

    def configure_method(self, settings) -> None:
        config = parse_config(CacheDiTConfig, settings, what=NAME)
        if self._cache is not None:
            self._cache.configure(config)
        self.config = config

    def apply(self, pipeline) -> None:
        self._cache = apply_cache_dit(only_transformer(pipeline, self.name), self.config)

    def remove(self, pipeline) -> None:
        if self._cache is not None:
            self._cache.remove()
        self._cache = None

    def start_request(self, num_steps, overrides) -> None:
        if self._cache is not None:
            self._cache.begin_request(num_steps, overrides)

    def request_stats(self) -> dict[str, Any] | None:
        return None if self._cache is None else self._cache.stats()
