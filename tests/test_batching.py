"""Batched runs: one transformer call for both CFG branches and several requests, each image and each request's
cache statistics exactly what the request gets alone."""

import threading

import numpy as np
import pytest
import torch
from conftest import pixels, wait_until

from teaserve import OmniDiffusionSamplingParams
from teaserve.cache import LearnedCacheBackend, NoCache, TeaCacheBackend, row_group_label, stats_of_request
from teaserve.engine import AsyncEngine, RequestCancelledError
from teaserve.pipelines.base import PipelineInputs
from teaserve.pipelines.qwen_image import QwenImage, stack_text_rows
from teaserve.pipelines.testing import tiny_qwen_pipeline

STEPS = 12
FAMILY = QwenImage()


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_qwen_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(prompt="a cat", seed=1, *, outputs=1, negative=" ", scale=4.0) -> PipelineInputs:
    return PipelineInputs(
        prompt=prompt,
        negative_prompt=negative,
        images=[],
        mask=None,
        width=64,
        height=64,
        num_inference_steps=STEPS,
        true_cfg_scale=scale,
        guidance_scale=None,
        num_outputs=outputs,
        generators=[torch.Generator("cpu").manual_seed(seed + index) for index in range(outputs)],
    )


def alone(pipe, generation: PipelineInputs):
    """The images the diffusers pipeline itself makes for one generation."""
    with torch.inference_mode():
        return pipe(**FAMILY.call_kwargs(pipe, generation)).images


def batched(pipe, batch, cache=None):
    """Images of `batch` in one batched run, and each generation's cache statistics."""
    cache = cache or NoCache()
    cache.begin_request(STEPS, None)
    cache.set_row_groups([row_group_label(index, branch) for index, branch in FAMILY.batch_rows(batch)])
    with torch.inference_mode():
        images = FAMILY.run_batch(pipe, batch, lambda step, latents: cache.set_step(step + 1))
    stats = cache.stats()
    return images, [stats_of_request(stats, index) for index in range(len(batch))]


def assert_same_images(expected, actual):
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual, strict=True):
        assert np.abs(pixels(want) - pixels(got)).max() <= 1


def same_schedules(stats, expected) -> bool:
    """Per branch: the same steps computed and skipped, for the same gate changes (within float tolerance)."""
    assert set(stats["branches"]) == set(expected["branches"]) == {"cond", "uncond"}
    for name, branch in stats["branches"].items():
        assert branch["schedule"] == expected["branches"][name]["schedule"]
        if "rel_l1" in branch:
            assert np.allclose(branch["rel_l1"][1:], expected["branches"][name]["rel_l1"][1:], rtol=1e-4)
    return True


def count_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("scale", [4.0, 1.0], ids=["true-cfg", "no-cfg"])
def test_a_batched_run_of_one_generation_is_the_pipeline_in_half_the_calls(pipe, scale):
    generation = inputs(outputs=2, scale=scale)
    calls, handle = count_calls(pipe.transformer)
    try:
        images, _ = batched(pipe, [generation])
    finally:
        handle.remove()
    assert len(calls) == STEPS  # both CFG branches in one call per step
    assert_same_images(alone(pipe, inputs(outputs=2, scale=scale)), images[0])


def test_generations_batched_together_each_get_their_own_image(pipe):
    batch = [
        inputs("a cat", 1),
        inputs("a red dog running on the grass in the sun", 7, outputs=2, negative="blurry, low quality"),
        inputs("a cat", 3, negative=" "),
    ]
    images, _ = batched(pipe, batch)
    for generation, own in zip(
        [
            inputs("a cat", 1),
            inputs("a red dog running on the grass in the sun", 7, outputs=2, negative="blurry, low quality"),
            inputs("a cat", 3),
        ],
        images,
        strict=True,
    ):
        assert_same_images(alone(pipe, generation), own)


def test_text_rows_are_padded_and_masked_only_where_needed():
    short, long = torch.ones(1, 2, 3), torch.full((1, 4, 3), 2.0)
    embeds, mask = stack_text_rows([(long, None), (long, None)])
    assert mask is None and embeds.shape == (2, 4, 3)
    embeds, mask = stack_text_rows([(short, None), (long, None)])
    assert embeds.shape == (2, 4, 3) and torch.equal(embeds[0, 2:], torch.zeros(2, 3))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("backend", ["tea_cache", "learned"])
def test_cached_generations_batched_together_match_their_runs_alone(pipe, backend):
    """At rel_l1_thresh 0.2 seed 2 skips on other steps than seeds 1 and 3 (checked below), so the batch has steps
    where some rows compute while others reuse their residual."""
    settings = {"rel_l1_thresh": 0.2} if backend == "tea_cache" else {"speedup": 3.0}
    cache = {"tea_cache": TeaCacheBackend, "learned": LearnedCacheBackend}[backend].from_config(settings)
    cache.apply(pipe)
    try:
        seeds = (1, 2, 3)
        solo = [batched(pipe, [inputs(seed=seed)], cache) for seed in seeds]
        images, stats = batched(pipe, [inputs(seed=seed) for seed in seeds], cache)
    finally:
        cache.remove(pipe)
    schedules = [own["branches"]["cond"]["schedule"] for own in stats]
    if backend == "tea_cache":
        assert len(set(schedules)) > 1, schedules  # the mixed case is exercised
    for (solo_images, (solo_stats,)), own_images, own_stats in zip(solo, images, stats, strict=True):
        assert_same_images(solo_images[0], own_images)
        assert same_schedules(own_stats, solo_stats)
        assert own_stats["computed_steps"] == solo_stats["computed_steps"] < 2 * STEPS


# -- the engine ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(tiny_qwen):
    batching = AsyncEngine(str(tiny_qwen), cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.2})
    alone_engine = AsyncEngine(str(tiny_qwen), cache_backend="tea_cache", max_batch_size=1)
    yield batching, alone_engine
    batching.shutdown()
    alone_engine.shutdown()


def params(seed, **settings):
    return OmniDiffusionSamplingParams(num_inference_steps=STEPS, seed=seed, **settings)


def run_while_busy(engine, requests, *, hold=None):
    """Submit `requests` while the worker is inside a first request, so that they wait in the queue together."""
    running, submitted = threading.Event(), threading.Event()

    def wait_for_the_others(event):
        if event.step == 1:
            running.set()
            submitted.wait(30)

    first = engine.submit(engine.prepare("a dog", params(99)), on_progress=wait_for_the_others)
    assert running.wait(30)
    handles = [engine.submit(request, on_progress=hold) for request in requests]
    submitted.set()
    first.result(60)
    return handles


def test_the_engine_batches_compatible_queued_requests(engines):
    engine, alone_engine = engines
    prompts = [("a cat", params(1)), ("a bird", params(2, num_outputs_per_prompt=2)), ("a cat", params(3))]
    odd = ("a cat", params(4, width=48, height=48))  # another size: never in the same batch
    handles = run_while_busy(engine, [engine.prepare(*p) for p in [*prompts, odd]])
    outputs = [handle.result(60) for handle in handles]
    assert [output.metrics.batch_size for output in outputs] == [3, 3, 3, 1]
    for (prompt, request_params), output in zip([*prompts, odd], outputs, strict=True):
        expected = alone_engine.submit(alone_engine.prepare(prompt, request_params)).result(60)
        assert expected.metrics.batch_size == 1
        assert_same_images(expected.images, output.images)
        assert same_schedules(output.metrics.cache, expected.metrics.cache)
        assert output.metrics.transformer_calls == expected.metrics.transformer_calls == 2 * STEPS


def test_requests_with_other_cache_settings_are_not_batched_together(engines):
    engine, _ = engines
    requests = [
        engine.prepare("a cat", params(1)),
        engine.prepare("a cat", params(2, cache_config={"rel_l1_thresh": 0.5})),
        engine.prepare("a cat", params(3)),
    ]
    outputs = [handle.result(60) for handle in run_while_busy(engine, requests)]
    assert [output.metrics.batch_size for output in outputs] == [2, 1, 2]


def test_cancelling_one_request_of_a_batch_lets_the_others_finish(engines):
    engine, alone_engine = engines
    handles: list = []

    def cancel_at_step_3(event):
        if event.step == 3 and event.request_id == handles[0].request_id:
            handles[0].cancel()

    requests = [engine.prepare("a cat", params(seed)) for seed in (1, 2)]
    handles.extend(run_while_busy(engine, requests, hold=cancel_at_step_3))
    with pytest.raises((RequestCancelledError, Exception)):
        handles[0].result(60)
    survivor = handles[1].result(60)
    assert survivor.metrics.batch_size == 2
    expected = alone_engine.submit(alone_engine.prepare("a cat", params(2))).result(60)
    assert_same_images(expected.images, survivor.images)


def test_max_batch_size_one_runs_every_request_alone(engines):
    _, alone_engine = engines
    requests = [alone_engine.prepare("a cat", params(seed)) for seed in (1, 2, 3)]
    outputs = [handle.result(60) for handle in run_while_busy(alone_engine, requests)]
    assert [output.metrics.batch_size for output in outputs] == [1, 1, 1]


def test_under_load_a_request_waits_up_to_batch_wait_ms_for_partners(tiny_qwen):
    """After a batch of two, the next request waits (here up to 10 s) for one partner; a request that follows a
    lone one starts at once."""
    engine = AsyncEngine(str(tiny_qwen), cache_backend="tea_cache", batch_wait_ms=10_000)
    try:
        lone = engine.submit(engine.prepare("a cat", params(1)))
        assert lone.result(30).metrics.batch_size == 1  # a lone client never waits for a partner
        pair = run_while_busy(engine, [engine.prepare("a cat", params(seed)) for seed in (2, 3)])
        assert [handle.result(60).metrics.batch_size for handle in pair] == [2, 2]
        first = engine.submit(engine.prepare("a cat", params(4)))
        wait_until(lambda: engine.num_running == 0 and engine.queue_depth == 0)  # taken, waiting for a partner
        second = engine.submit(engine.prepare("a bird", params(5)))
        assert [first.result(60).metrics.batch_size, second.result(60).metrics.batch_size] == [2, 2]
    finally:
        engine.shutdown()


# -- TeaCache's shortcut: a step every row skips runs no block and no text stream ----------------------------------
def run_pipeline_with_teacache(pipe, target, threshold):
    from teaserve.cache import TeaCacheConfig, apply_teacache, remove_teacache

    teacache = apply_teacache(pipe.transformer, TeaCacheConfig(rel_l1_thresh=threshold), target=target)
    teacache.num_inference_steps = STEPS
    calls = {
        name: count_calls(module)
        for name, module in [("txt_in", pipe.transformer.txt_in), ("block", pipe.transformer.transformer_blocks[1])]
    }
    try:
        images = alone(pipe, inputs())
    finally:
        for _, handle in calls.values():
            handle.remove()
        remove_teacache(pipe.transformer)
    return images, teacache.stats(), {name: len(counted) for name, (counted, _) in calls.items()}


def test_teacache_skips_through_the_targets_shortcut_with_the_same_images(pipe):
    import dataclasses

    from teaserve.cache import cache_target_for

    target = cache_target_for(pipe.transformer)
    assert target.shortcut is not None
    images, stats, calls = run_pipeline_with_teacache(pipe, target, 0.3)
    plain_images, plain_stats, plain_calls = run_pipeline_with_teacache(
        pipe, dataclasses.replace(target, shortcut=None), 0.3
    )
    computed = stats["computed_steps"]
    assert 0 < computed < 2 * STEPS and plain_stats["branches"] == stats["branches"]
    assert calls == {"txt_in": computed, "block": computed}  # a skipped call runs neither
    assert plain_calls == {"txt_in": 2 * STEPS, "block": 2 * STEPS}  # the block hooks pass through instead
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(images, plain_images, strict=True))


def test_each_request_of_a_batch_gets_its_own_progress_and_previews(engines):
    engine, alone_engine = engines
    events: dict[str, list] = {}

    def record(event):
        events.setdefault(event.request_id, []).append(event)

    prompts = [("a cat", params(1, num_outputs_per_prompt=2)), ("a bird", params(2))]
    requests = [engine.prepare(prompt, request_params, num_previews=2) for prompt, request_params in prompts]
    outputs = [handle.result(60) for handle in run_while_busy(engine, requests, hold=record)]
    assert [output.metrics.batch_size for output in outputs] == [2, 2]
    for (prompt, request_params), request in zip(prompts, requests, strict=True):
        alone_events: list = []
        solo = alone_engine.prepare(prompt, request_params, num_previews=2)
        alone_engine.submit(solo, on_progress=alone_events.append).result(60)
        own = events[request.request_id]
        assert [event.step for event in own] == [event.step for event in alone_events] == list(range(1, STEPS + 1))
        previews = [event.previews for event in own if event.previews]
        alone_previews = [event.previews for event in alone_events if event.previews]
        assert len(previews) == len(alone_previews) == 2
        for batched_images, solo_images in zip(previews, alone_previews, strict=True):
            assert len(batched_images) == request_params.num_outputs_per_prompt
            assert_same_images(solo_images, batched_images)
