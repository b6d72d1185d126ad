"""The cache_dit backend: cache-dit's DBCache (and TaylorSeer) on teaserve's cache targets.

cache-dit is an optional extra: the tests that run it skip without it; its settings and the error that names the
extra when it is missing are tested either way.
"""

import math
import sys

import numpy as np
import pytest
import torch
from conftest import pixels

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.cache import CacheSettingsError, create_cache_backend, parse_config
from teaserve.cache.cache_dit import CacheDiTConfig, apply_cache_dit

STEPS = 10
FLUX_STEPS = 6
WARMUP = 4
"""CacheDiTConfig's default max_warmup_steps."""


@pytest.fixture(scope="module")
def cache_dit():
    return pytest.importorskip("cache_dit")


# -- without the extra ----------------------------------------------------------------------------------------------
def test_selecting_the_backend_without_cache_dit_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cache_dit", None)  # what an environment without the package gives: no import
    with pytest.raises(ValueError) as error:
        create_cache_backend("cache_dit", {})
    assert "the cache_dit cache backend needs the cache-dit package" in str(error.value)
    assert "pip install 'teaserve[cache-dit]'" in str(error.value)


def config(settings):
    return parse_config(CacheDiTConfig, settings, what="cache_dit")


def test_settings_are_strict_and_name_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown cache_dit setting\(s\) \['Fn'\]; valid keys: residual_diff_thr"):
        config({"Fn": 2})
    bad = [
        {"residual_diff_threshold": 0},
        {"residual_diff_threshold": 1.5},
        {"residual_diff_threshold": math.nan},
        {"residual_diff_threshold": "0.1"},
        {"Fn_compute_blocks": 0},
        {"Fn_compute_blocks": True},
        {"Bn_compute_blocks": -1},
        {"max_warmup_steps": 2.0},
        {"max_cached_steps": 10**9},
        {"enable_taylorseer": 1},
        {"taylorseer_order": 5},
    ]
    for settings in bad:
        with pytest.raises(ValueError, match="valid keys: residual_diff_threshold, Fn_compute_blocks"):
            config(settings)
    assert config({"residual_diff_threshold": 1, "max_cached_steps": None}).residual_diff_threshold == 1.0


def test_request_overrides_are_checked(cache_dit):
    backend = create_cache_backend("cache_dit", {})
    assert backend.check_overrides({"enabled": False, "residual_diff_threshold": 0.5}) == {
        "enabled": False,
        "residual_diff_threshold": 0.5,
    }
    for overrides, message in [
        ({"residual_diff_threshold": 2}, r"residual_diff_threshold must be a number in \(0, 1\]"),
        ({"residual_diff_threshold": math.inf}, "residual_diff_threshold must be"),
        ({"Fn_compute_blocks": 2}, "cannot be set per request with cache_dit; valid keys for a request: enabled, "),
        ({"enabled": "no"}, "'enabled' must be true or false"),
    ]:
        with pytest.raises(CacheSettingsError, match=message):
            backend.check_overrides(overrides)


# -- through the engine on a tiny Qwen-Image ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain(tiny_qwen):
    with Omni(model=str(tiny_qwen)) as omni:
        yield omni


@pytest.fixture(scope="module")
def omni(tiny_qwen, cache_dit):
    with Omni(model=str(tiny_qwen), cache_backend="cache_dit", cache_config={"residual_diff_threshold": 0.2}) as omni:
        yield omni


def generate(omni, cache_config=None, **params):
    params = OmniDiffusionSamplingParams(num_inference_steps=STEPS, seed=5, cache_config=cache_config, **params)
    return omni.generate("a cat", params)[0]


def test_disabled_per_request_is_pixel_identical_to_no_cache(omni, plain):
    reference = pixels(generate(plain).images[0])
    disabled = generate(omni, {"enabled": False})
    assert np.array_equal(pixels(disabled.images[0]), reference)
    cache = disabled.metrics.cache
    assert cache["enabled"] is False and cache["skipped_steps"] == 0
    assert cache["computed_steps"] == 2 * STEPS and cache["block_evaluations"] == 2 * STEPS * cache["num_blocks"]


def test_the_largest_threshold_skips_every_step_after_the_warmup_in_each_branch(omni):
    output = generate(omni, {"residual_diff_threshold": 1})
    cache = output.metrics.cache
    assert set(cache["branches"]) == {"cond", "uncond"}
    for branch in cache["branches"].values():
        assert branch["schedule"] == "C" * WARMUP + "S" * (STEPS - WARMUP)
        # a skipped step still runs the first block (Fn_compute_blocks=1), whose residual is the gate signal
        assert branch["block_evaluations"] == WARMUP * cache["num_blocks"] + (STEPS - WARMUP) * 1
    assert cache["computed_steps"] == 2 * WARMUP and cache["skipped_steps"] == 2 * (STEPS - WARMUP)
    assert output.metrics.transformer_calls == 2 * STEPS


def test_skips_never_decrease_as_the_threshold_grows(omni):
    thresholds = [0.01, 0.1, 0.3, 0.6, 1.0]
    skipped = [generate(omni, {"residual_diff_threshold": t}).metrics.cache["skipped_steps"] for t in thresholds]
    assert skipped == sorted(skipped) and skipped[-1] == 2 * (STEPS - WARMUP) and skipped[0] < skipped[-1]


def test_a_request_without_cfg_has_one_branch_and_still_skips(omni):
    output = generate(omni, {"residual_diff_threshold": 1}, true_cfg_scale=1.0)
    (branch,) = output.metrics.cache["branches"].values()
    assert "cond" in output.metrics.cache["branches"]
    assert branch["schedule"] == "C" * WARMUP + "S" * (STEPS - WARMUP)


def test_the_override_applies_once_and_two_requests_in_a_row_are_identical(omni):
    default = generate(omni)
    override = generate(omni, {"residual_diff_threshold": 1})
    again = generate(omni)
    assert default.metrics.cache["residual_diff_threshold"] == 0.2
    assert override.metrics.cache["skipped_steps"] > default.metrics.cache["skipped_steps"]
    assert again.metrics.cache == default.metrics.cache
    assert np.array_equal(pixels(again.images[0]), pixels(default.images[0]))


def test_taylorseer_forecasts_the_skipped_blocks_instead_of_reusing_them(tiny_qwen, plain, cache_dit):
    # TaylorSeer forecasts from the fourth computed step of its context on (the second step of a request opens it)
    settings = {"residual_diff_threshold": 1, "max_warmup_steps": 6}
    taylorseer = {**settings, "enable_taylorseer": True, "taylorseer_order": 2}
    with Omni(model=str(tiny_qwen), cache_backend="cache_dit", cache_config=taylorseer) as omni:
        forecast = generate(omni)
        forecast_disabled = generate(omni, {"enabled": False})
        omni.engine.cache.configure(settings)
        reused = generate(omni)
    assert forecast.metrics.cache["branches"] == reused.metrics.cache["branches"]  # the same steps skipped
    assert not np.array_equal(pixels(forecast.images[0]), pixels(reused.images[0]))
    assert np.array_equal(pixels(forecast_disabled.images[0]), pixels(generate_uncached(tiny_qwen)))


def generate_uncached(tiny_qwen):
    with Omni(model=str(tiny_qwen)) as omni:
        return pixels(generate(omni).images[0])


def test_removing_the_cache_restores_the_uncached_forward(tiny_qwen, plain, cache_dit):
    reference = pixels(generate(plain).images[0])
    with Omni(model=str(tiny_qwen), cache_backend="cache_dit", cache_config={"residual_diff_threshold": 1}) as omni:
        transformer = omni.model.pipeline.transformer
        assert not np.array_equal(pixels(generate(omni).images[0]), reference)
        omni.engine.cache.remove(omni.model.pipeline)
        assert "forward" not in vars(transformer) and not hasattr(transformer, "_context_manager")
        restored = generate(omni)
    assert np.array_equal(pixels(restored.images[0]), reference)
    assert restored.metrics.cache is None


def test_a_transformer_that_other_hooks_wrap_is_refused_and_left_working(cache_dit):
    from teaserve import remove_teacache
    from teaserve.pipelines.testing import tiny_qwen_pipeline

    pipe = tiny_qwen_pipeline()
    teacache = create_cache_backend("tea_cache", {"rel_l1_thresh": 1e-9})
    teacache.apply(pipe)
    with pytest.raises(ValueError, match="cannot share a transformer with other hooks on its forward"):
        apply_cache_dit(pipe.transformer)
    assert not getattr(pipe.transformer, "_is_cached", False)  # nothing of cache-dit was put on
    remove_teacache(pipe.transformer)
    apply_cache_dit(pipe.transformer).remove()  # once the other hooks are off, it applies


def test_block_counts_that_do_not_fit_the_stack_are_refused(tiny_qwen, cache_dit):
    # the tiny Qwen-Image has 2 blocks
    with pytest.raises(ValueError, match=r"Fn_compute_blocks \+ Bn_compute_blocks \(2 \+ 1\) must be at most 2"):
        Omni(
            model=str(tiny_qwen),
            cache_backend="cache_dit",
            cache_config={"Fn_compute_blocks": 2, "Bn_compute_blocks": 1},
        )


# -- on diffusers pipelines directly: tiny Flux, with and without true CFG --------------------------------------------
@pytest.fixture(scope="module")
def flux_pipeline():
    from diffusers import FluxTransformer2DModel

    from teaserve.pipelines.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(1)  # more blocks per list than the fast-test sizes, so that each list has some to skip
    pipe.transformer = FluxTransformer2DModel.from_config(
        {**pipe.transformer.config, "num_layers": 3, "num_single_layers": 3}
    ).eval()
    return pipe


def run_flux(pipe, **kwargs):
    image = pipe(
        "a cat", num_inference_steps=FLUX_STEPS, height=32, width=32, generator=torch.Generator().manual_seed(0),
        output_type="np", **kwargs,
    ).images[0]  # fmt: skip
    return image


@torch.no_grad()
def test_flux_double_and_single_block_lists_are_cached_per_cfg_branch(flux_pipeline, cache_dit):
    pipe = flux_pipeline
    true_cfg = {"negative_prompt": "a dog", "true_cfg_scale": 2.0}
    reference, reference_cfg = run_flux(pipe), run_flux(pipe, **true_cfg)
    cache = apply_cache_dit(pipe.transformer, CacheDiTConfig(residual_diff_threshold=1, max_warmup_steps=2))
    try:
        assert [(block_list.name, block_list.pattern) for block_list in cache.lists] == [
            ("transformer_blocks", "Pattern_1"),
            ("single_transformer_blocks", "Pattern_1"),
        ]
        cache.begin_request(FLUX_STEPS, {"enabled": False})
        assert np.array_equal(run_flux(pipe), reference)
        cache.begin_request(FLUX_STEPS)
        skipped = run_flux(pipe)
        assert not np.array_equal(skipped, reference)
        # each list skips its 2 middle blocks: a skipped step evaluates 2 of the 6 blocks
        assert cache.stats()["branches"] == {
            "cond": {
                "computed_steps": 2,
                "skipped_steps": FLUX_STEPS - 2,
                "schedule": "CC" + "S" * (FLUX_STEPS - 2),
                "block_evaluations": 2 * 6 + (FLUX_STEPS - 2) * 2,
            }
        }
        # without begin_request a pipeline call is a request with the same settings
        assert np.array_equal(run_flux(pipe), skipped)
        run_flux(pipe, **true_cfg)
        branches = cache.stats()["branches"]
        assert {name: branch["schedule"] for name, branch in branches.items()} == {
            "cond": "CC" + "S" * (FLUX_STEPS - 2),
            "uncond": "CC" + "S" * (FLUX_STEPS - 2),
        }
    finally:
        cache.remove()
    assert np.array_equal(run_flux(pipe, **true_cfg), reference_cfg)


# -- models cache-dit cannot cache -----------------------------------------------------------------------------------
def test_a_mixture_of_transformers_model_is_refused_with_a_clear_error(tmp_path, cache_dit):
    from teaserve.pipelines.bagel.testing import build_tiny_bagel

    with pytest.raises(ValueError, match="the cache_dit cache backend cannot cache BagelModel: its block stack is"):
        Omni(model=str(build_tiny_bagel(tmp_path / "bagel")), cache_backend="cache_dit")


# -- the embedded default model ------------------------------------------------------------------------------------
def test_the_embedded_model_skips_with_sane_quality(cache_dit):
    from teaserve.evaluation.metrics import psnr
    from teaserve.evaluation.prompts import model_prompts
    from teaserve.pipelines.default_model import SERVED_MODEL_NAME

    prompts = model_prompts(SERVED_MODEL_NAME, held_out=True)[0][:2]
    params = OmniDiffusionSamplingParams(num_inference_steps=20, seed=0)
    with Omni(cache_backend="cache_dit") as omni:
        for prompt in prompts:
            (reference,) = omni.generate(prompt, params.replace(cache_config={"enabled": False}))
            (cached,) = omni.generate(prompt, params)
            cache = cached.metrics.cache
            assert cache["skipped_steps"] >= 8
            assert cache["block_evaluations"] < 0.8 * reference.metrics.cache["block_evaluations"]
            assert psnr(cached.images[0], reference.images[0]) > 35
