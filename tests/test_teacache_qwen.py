"""TeaCache through the engine on a tiny Qwen-Image: exactness, schedules, state isolation, CFG branches."""

import numpy as np
import pytest
from conftest import pixels

from teaserve import Omni, OmniDiffusionSamplingParams

STEPS = 12


@pytest.fixture(scope="module")
def omni(tiny_qwen):
    with Omni(model=str(tiny_qwen), cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.2}) as omni:
        yield omni


def generate(omni, cache_config=None, seed=5):
    params = OmniDiffusionSamplingParams(num_inference_steps=STEPS, seed=seed, cache_config=cache_config)
    return omni.generate("a cat", params)[0]


def test_a_threshold_that_never_skips_is_pixel_identical_to_no_cache(omni):
    uncached = generate(omni, {"enabled": False})
    never_skips = generate(omni, {"rel_l1_thresh": 1e-12})
    assert never_skips.metrics.cache["skipped_steps"] == 0
    assert np.array_equal(pixels(uncached.images[0]), pixels(never_skips.images[0]))


def test_huge_threshold_computes_only_first_and_last_steps_per_branch(omni):
    output = generate(omni, {"rel_l1_thresh": 1e9})
    branches = output.metrics.cache["branches"]
    assert set(branches) == {"cond", "uncond"}
    for branch in branches.values():
        assert branch["schedule"] == "C" + "S" * (STEPS - 2) + "C"
    # the transformer still runs (embedders, output norm); only the block stack is skipped
    assert output.metrics.transformer_calls == 2 * STEPS


def test_skips_never_decrease_as_the_threshold_grows(omni):
    thresholds = [1e-12, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 1e9]
    skipped = [generate(omni, {"rel_l1_thresh": t}).metrics.cache["skipped_steps"] for t in thresholds]
    assert skipped == sorted(skipped)
    assert skipped[0] == 0 and skipped[-1] == 2 * (STEPS - 2)
    assert len(set(skipped)) >= 4


def test_cfg_branches_are_counted_separately(omni):
    output = generate(omni, {"rel_l1_thresh": 0.4})
    cache = output.metrics.cache
    cond, uncond = cache["branches"]["cond"], cache["branches"]["uncond"]
    for branch in (cond, uncond):
        assert branch["computed_steps"] + branch["skipped_steps"] == STEPS
        assert len(branch["rel_l1"]) == STEPS and branch["rel_l1"][0] is None
    assert cache["computed_steps"] == cond["computed_steps"] + uncond["computed_steps"]
    no_cfg = omni.generate("a cat", OmniDiffusionSamplingParams(num_inference_steps=STEPS, true_cfg_scale=1.0))[0]
    assert set(no_cfg.metrics.cache["branches"]) == {"cond"}


def test_two_requests_in_a_row_are_identical(omni):
    first, second = generate(omni), generate(omni)
    assert first.metrics.cache == second.metrics.cache
    assert np.array_equal(pixels(first.images[0]), pixels(second.images[0]))


def test_request_override_applies_once_then_the_default_returns(omni):
    default = generate(omni)
    override = generate(omni, {"rel_l1_thresh": 1e9})
    back = generate(omni)
    assert default.metrics.cache["rel_l1_thresh"] == 0.2 == back.metrics.cache["rel_l1_thresh"]
    assert override.metrics.cache["skipped_steps"] > default.metrics.cache["skipped_steps"]
    assert back.metrics.cache == default.metrics.cache


def test_different_step_counts_in_a_row_each_force_their_own_last_step(omni):
    for steps in (6, 3, 9):
        params = OmniDiffusionSamplingParams(num_inference_steps=steps, cache_config={"rel_l1_thresh": 1e9})
        (output,) = omni.generate("a cat", params)
        assert output.metrics.cache["branches"]["cond"]["schedule"] == "C" + "S" * (steps - 2) + "C"


def test_removing_the_cache_restores_the_uncached_output(tiny_qwen):
    with Omni(model=str(tiny_qwen)) as plain:
        reference = generate(plain)
    with Omni(model=str(tiny_qwen), cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.8}) as cached:
        assert generate(cached).metrics.cache["skipped_steps"] > 0
        cached.engine.cache.remove(cached.model.pipeline)
        restored = generate(cached)
    assert np.abs(pixels(restored.images[0]) - pixels(reference.images[0])).max() <= 1


def test_environment_variable_enables_tea_cache(tiny_qwen, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CACHE_BACKEND", "tea_cache")
    with Omni(model=str(tiny_qwen)) as omni:
        assert omni.engine.cache_backend_name == "tea_cache"
        output = generate(omni, {"rel_l1_thresh": 1e9})
    assert output.metrics.cache["backend"] == "tea_cache" and output.metrics.cache["skipped_steps"] > 0
