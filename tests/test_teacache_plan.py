"""TeaCache on Wan, whose gate depends on the timestep alone: the schedule planned from a request's timesteps
before its first step, against the rule run on each call's own gate; the published coefficients per checkpoint;
the other cache methods on Wan.
"""

import contextlib
import dataclasses
from importlib.util import find_spec

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from teaserve.cache import TeaCacheConfig, apply_teacache, cache_target_for, create_cache_backend, plan_schedule
from teaserve.cache.teacache import remove_teacache
from teaserve.pipelines import load_model, wan
from teaserve.pipelines.testing import build_tiny_wan, tiny_wan_pipeline

IDENTITY = (0.0, 0.0, 0.0, 1.0, 0.0)
STEPS = 8


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_wan_pipeline("t2v")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def target(pipe):
    return cache_target_for(pipe.transformer)


def generate(pipe, steps=STEPS) -> np.ndarray:
    """A video with Wan's CFG: two branches, "cond" and "uncond"."""
    return pipe(
        "a cat", negative_prompt="", guidance_scale=5.0, height=16, width=32, num_frames=5,
        num_inference_steps=steps, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames  # fmt: skip


@contextlib.contextmanager
def teacache(pipe, threshold, *, target=None, timesteps="scheduler", steps=STEPS, **config):
    """TeaCache with identity coefficients on the pipeline's transformer, reading the request's timesteps from its
    scheduler (the plan) unless `timesteps` is None or another source."""
    if timesteps == "scheduler":
        timesteps = lambda: pipe.scheduler.timesteps  # noqa: E731
    config = TeaCacheConfig(rel_l1_thresh=threshold, coefficients=IDENTITY, **config)
    cache = apply_teacache(pipe.transformer, config, target=target, num_inference_steps=steps, timesteps=timesteps)
    try:
        yield cache
    finally:
        remove_teacache(pipe.transformer)


def run(pipe, threshold, **options):
    with teacache(pipe, threshold, **options) as cache:
        frames = generate(pipe, options.get("steps", STEPS))
        return frames, cache.stats()["branches"]


def without_plan(target):
    """The rule on each call's own gate, in the first block (no timestep gate, no shortcut)."""
    return dataclasses.replace(target, timestep_gate=None, shortcut=None)


@pytest.fixture(scope="module")
def uncached(pipe):
    return generate(pipe)


@pytest.fixture(scope="module")
def online(pipe, target):
    """(frames, branches) of the rule on each call's own gate, by threshold."""
    results = {}

    def result(threshold):
        if threshold not in results:
            results[threshold] = run(pipe, threshold, target=without_plan(target))
        return results[threshold]

    return result


@pytest.mark.parametrize("threshold", [0.2, 0.45, 0.8])
def test_planned_decisions_are_the_online_rules_and_known_from_the_timesteps_alone(pipe, online, threshold):
    pipe.scheduler.set_timesteps(STEPS)
    config = TeaCacheConfig(rel_l1_thresh=threshold, coefficients=IDENTITY)
    before = plan_schedule(pipe.transformer, pipe.scheduler.timesteps, config)
    planned_frames, planned = run(pipe, threshold)
    online_frames, online_branches = online(threshold)
    for name in ("cond", "uncond"):
        assert before == planned[name]["planned_schedule"] == planned[name]["schedule"]
        assert online_branches[name]["planned_schedule"] is None
        for key in ("schedule", "rel_l1", "accumulated"):
            assert planned[name][key] == online_branches[name][key]
    assert "S" in before and "C" in before[1:-1]
    # A skipped step runs the shortcut around the block stack: the same output as the blocks passing it through.
    assert np.array_equal(planned_frames, online_frames)


def test_the_plan_holds_in_bfloat16_with_the_timestep_embedding_kept_in_float32(tmp_path):
    """As Wan loads on GPUs: bfloat16, the timestep embedder kept in float32 and its output cast to the text's
    dtype; the planned gates are the blocks' own, to the bit."""
    pipe = load_model(str(build_tiny_wan(tmp_path)), dtype="bfloat16").pipeline
    assert pipe.transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    target = cache_target_for(pipe.transformer)
    planned_frames, planned = run(pipe, 0.45)
    online_frames, online = run(pipe, 0.45, target=without_plan(target))
    assert planned["cond"]["planned_schedule"] == planned["cond"]["schedule"] == online["cond"]["schedule"]
    assert planned["cond"]["rel_l1"] == online["cond"]["rel_l1"]
    assert np.array_equal(planned_frames, online_frames)


def test_never_skipping_is_uncached_and_a_huge_threshold_computes_only_the_forced_steps(pipe, uncached):
    exact, branches = run(pipe, 1e-9)
    assert np.array_equal(exact, uncached)
    assert branches["cond"]["schedule"] == "C" * STEPS
    _, huge = run(pipe, 1e9)
    assert {name: branch["schedule"] for name, branch in huge.items()} == {"cond": "CSSSSSSC", "uncond": "CSSSSSSC"}
    _, retained = run(pipe, 1e9, retention_steps=3)
    assert retained["cond"]["schedule"] == retained["cond"]["planned_schedule"] == "CCCSSSSC"


class Counter:
    """Counts its calls: a wrapper of `function`, or a forward pre-hook that changes nothing."""

    def __init__(self, function=None):
        self.calls, self.function = 0, function

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.function(*args, **kwargs) if self.function else None


def test_planned_calls_compute_no_gate_and_skipped_ones_run_no_block_nor_text_embedding(pipe, target):
    transformer = pipe.transformer
    counts = {}
    for plan in (True, False):
        gate = Counter(target.gate)
        blocks, texts = Counter(), Counter()
        handles = [
            transformer.blocks[0].register_forward_pre_hook(blocks),
            transformer.condition_embedder.text_embedder.register_forward_pre_hook(texts),
        ]
        options = {"target": dataclasses.replace(target, gate=gate)}
        if not plan:
            options = {"target": without_plan(options["target"])}
        _, branches = run(pipe, 0.45, **options)
        for handle in handles:
            handle.remove()
        computed = sum(branch["computed_steps"] for branch in branches.values())
        counts[plan] = (gate.calls, blocks.calls, texts.calls, computed)
    computed = counts[True][3]
    assert computed < 2 * STEPS
    # The plan's gate is checked against the block's once per branch; then no call computes one.
    assert counts[True] == (2, computed, computed, computed)
    assert counts[False] == (2 * STEPS, 2 * STEPS, 2 * STEPS, computed)


@pytest.mark.parametrize("wrong", ["timesteps", "gate"])
def test_a_plan_the_calls_do_not_follow_gives_way_to_the_online_rule(pipe, target, online, wrong):
    """Other timesteps than the calls run, or a timestep gate that is not the block's: the plan is dropped at the
    first call and each call decides from its own gate, exactly as without a plan."""
    if wrong == "timesteps":
        options = {"timesteps": lambda: pipe.scheduler.timesteps + 1}
    else:
        options = {"target": dataclasses.replace(target, timestep_gate=lambda *args: target.timestep_gate(*args) * 2)}
    frames, branches = run(pipe, 0.45, **options)
    online_frames, online_branches = online(0.45)
    assert np.array_equal(frames, online_frames)
    for name in ("cond", "uncond"):
        assert branches[name]["planned_schedule"] is None
        assert branches[name]["schedule"] == online_branches[name]["schedule"]


def test_the_shortcut_and_the_timestep_gate_are_the_forward_around_the_block_stack(pipe, target):
    transformer = pipe.transformer
    seen = {}

    def keep(name, value):
        seen.setdefault(name, value)

    handles = [
        transformer.blocks[0].register_forward_pre_hook(lambda _, args: keep("first", args)),
        transformer.blocks[-1].register_forward_hook(lambda _, args, output: keep("last", output)),
        transformer.register_forward_pre_hook(lambda _, args, kwargs: keep("call", kwargs), with_kwargs=True),
        transformer.register_forward_hook(lambda _, args, output: keep("output", output)),
    ]
    generate(pipe, steps=1)
    for handle in handles:
        handle.remove()
    call, (hidden, _, temb, _) = seen["call"], seen["first"]
    with torch.no_grad():
        entered = target.shortcut.enter(transformer, call)
        assert torch.equal(entered[0], hidden) and torch.equal(entered[1], temb)
        assert torch.equal(target.timestep_gate(transformer, call["timestep"]), temb)
        assert torch.equal(target.shortcut.leave(transformer, seen["last"], temb, call)[0], seen["output"][0])


def wan_transformer(**config):
    """A Wan transformer of a published configuration (WanTransformer3DModel's defaults: 14B), without weights."""
    with torch.device("meta"):
        return WanTransformer3DModel(**config)


@pytest.mark.parametrize(
    ("config", "name", "coefficients"),
    [
        ({"num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960}, "Wan2.1-T2V-1.3B", "WAN_T2V_1_3B"),
        ({}, "Wan2.1-T2V-14B", "WAN_T2V_14B"),
        ({"in_channels": 36, "image_dim": 1280}, "Wan2.1-I2V-14B-480P", "WAN_I2V_480P"),
        ({"in_channels": 36, "image_dim": 1280}, "Wan2.1-I2V-14B-720P", "WAN_I2V_720P"),
        ({"in_channels": 36}, "Wan2.2-I2V-A14B", None),
        ({"num_attention_heads": 24, "num_layers": 30, "in_channels": 48, "out_channels": 48}, "Wan2.2-TI2V-5B", None),
    ],
)
def test_each_published_checkpoint_gets_its_own_coefficients(config, name, coefficients):
    transformer = wan_transformer(**config)
    transformer.register_to_config(_name_or_path=f"/models/Wan-AI/{name}-Diffusers/transformer")
    recommended = cache_target_for(transformer).recommended(transformer, "tea_cache")
    if coefficients is None:
        assert recommended == {}
        with pytest.raises(ValueError, match="tea_cache has no coefficients for transformer WanTransformer3DModel"):
            apply_teacache(transformer)
    else:
        expected = getattr(wan, f"{coefficients}_COEFFICIENTS")
        assert recommended == {"coefficients": expected, "retention_steps": 5}
        assert len({getattr(wan, n) for n in dir(wan) if n.endswith("_COEFFICIENTS")}) == 4


def test_published_coefficients_go_with_their_five_retention_steps(pipe):
    pipe.scheduler.set_timesteps(STEPS)
    transformer = pipe.transformer
    transformer.register_to_config(num_layers=30, num_attention_heads=12, attention_head_dim=128)
    try:
        schedule = plan_schedule(transformer, pipe.scheduler.timesteps, TeaCacheConfig(rel_l1_thresh=1e9))
        own = plan_schedule(transformer, pipe.scheduler.timesteps, TeaCacheConfig(1e9, coefficients=IDENTITY))
    finally:
        transformer.register_to_config(num_layers=2, num_attention_heads=2, attention_head_dim=12)
    assert (schedule, own) == ("CCCCCSSC", "CSSSSSSC")


@pytest.mark.parametrize(
    ("backend", "error"),
    [
        ("first_block_cache", None),
        ("taylorseer", None),
        ("learned", None),
        ("mag_cache", "mag_cache has no magnitude ratios for transformer WanTransformer3DModel"),
        pytest.param(
            "cache_dit",
            "cannot cache WanTransformer3DModel",
            marks=pytest.mark.skipif(
                find_spec("cache_dit") is None, reason="cache-dit is not installed (teaserve[cache-dit])"
            ),
        ),
    ],
)
def test_the_other_cache_methods_run_on_wan_or_say_why_not(pipe, uncached, backend, error):
    cache = create_cache_backend(backend)
    if error is not None:
        with pytest.raises(ValueError, match=error):
            cache.apply(pipe)
        return
    cache.apply(pipe)
    try:
        cache.begin_request(STEPS)
        frames = pipe(
            "a cat", negative_prompt="", guidance_scale=5.0, height=16, width=32, num_frames=5,
            num_inference_steps=STEPS, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
            output_type="np", callback_on_step_end=lambda _, step, __, tensors: cache.set_step(step + 1) or tensors,
        ).frames  # fmt: skip
        stats = cache.stats()
    finally:
        cache.remove(pipe)
    assert stats["skipped_steps"] > 0 and set(stats["branches"]) == {"cond", "uncond"}
    assert not np.array_equal(frames, uncached)
    assert np.array_equal(generate(pipe), uncached)
