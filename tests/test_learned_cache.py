"""The learned forecaster: its schedule, its exact forecast arithmetic, its least-squares calibration, its settings,
and the backend on tiny Qwen-Image, Flux and BAGEL pipelines."""

import numpy as np
import pytest
import torch
from conftest import pixels
from diffusers import ConfigMixin, ModelMixin
from diffusers.models.cache_utils import CacheMixin

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.cache import (
    CacheSettingsError,
    CacheTarget,
    ForecastCalibrator,
    LearnedCacheBackend,
    create_cache_backend,
    register_cache_target,
)
from teaserve.cache.base import QualityTable
from teaserve.cache.learned import computed_count, computed_steps
from teaserve.pipelines.testing import tiny_flux_pipeline, tiny_qwen_pipeline


class StepTransformer(ModelMixin, ConfigMixin, CacheMixin):
    """Returns `scale(step) * ones`: a known output per call, so forecasts can be checked exactly."""

    def __init__(self):
        super().__init__()
        self.block = torch.nn.Identity()
        self.scales: list[float] = []
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(hidden_states, self.scales[int(timestep)])


register_cache_target(StepTransformer, CacheTarget(blocks=lambda model: [model.block], gate=lambda block, args: 0))


class StepPipeline:
    """Calls the transformer once per step under the "cond" context, like a diffusers pipeline without CFG."""

    def __init__(self, scales):
        self.transformer = StepTransformer()
        self.transformer.scales = list(scales)

    def __call__(self, backend, speedup=None):
        backend.begin_request(len(self.transformer.scales), None if speedup is None else {"speedup": speedup})
        outputs = []
        for step in range(len(self.transformer.scales)):
            backend.set_step(step)
            with self.transformer.cache_context("cond"):
                outputs.append(float(self.transformer(torch.zeros(2), torch.tensor(step))[0]))
        return outputs


def test_schedule_has_the_first_and_last_step_and_packs_towards_the_end_below_power_one():
    assert [computed_count(30, speedup) for speedup in (1.0, 3.0, 7.5, 1000.0)] == [30, 10, 4, 2]
    assert computed_count(2, 5.0) == 2
    assert computed_steps(30, 30, 0.7) == frozenset(range(30))
    assert computed_steps(30, 10, 1.0) == frozenset({0, 3, 6, 10, 13, 16, 19, 23, 26, 29})
    assert computed_steps(30, 5, 0.7) == frozenset({0, 11, 18, 24, 29})
    assert computed_steps(30, 2, 0.7) == frozenset({0, 29})
    # Crowded ends stay distinct steps.
    assert computed_steps(10, 9, 0.3) == frozenset({0, 2, 3, 4, 5, 6, 7, 8, 9})


def test_skipped_steps_are_the_weighted_sum_of_the_last_computed_outputs():
    scales = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    pipe = StepPipeline(scales)
    assert sorted(computed_steps(6, 3, 1.0)) == [0, 2, 5]
    weights = [None, [0.5], None, [2.0, -1.0], [1.0, 0.25], None]
    backend = LearnedCacheBackend.from_config({"schedule_power": 1.0, "forecast_weights": {"6": {"3": weights}}})
    backend.apply(pipe)
    outputs = pipe(backend, 2.0)
    # step 1: 0.5 * out(0); steps 3 and 4: w1 * out(2) + w2 * out(0)
    assert outputs == [1.0, 0.5, 3.0, 2 * 3.0 - 1.0, 3.0 + 0.25, 6.0]
    assert pipe.transformer.calls == 3
    stats = backend.stats()
    assert stats["forecast"] == "learned"
    assert stats["branches"] == {"cond": {"computed_steps": 3, "skipped_steps": 3, "schedule": "CSCSSC"}}
    assert (stats["computed_steps"], stats["skipped_steps"]) == (3, 3)

    # Without fitted weights for the schedule: the last computed output as it is.
    backend.configure({"schedule_power": 1.0})
    assert pipe(backend, 2.0) == [1.0, 1.0, 3.0, 3.0, 3.0, 6.0]
    assert backend.stats()["forecast"] == "reuse"

    # Off per request, and removed: every step computed.
    backend.begin_request(6, {"enabled": False})
    backend.remove(pipe)
    pipe.transformer.calls = 0
    assert pipe(create_cache_backend("none")) == scales
    assert pipe.transformer.calls == 6


def test_calibration_recovers_the_least_squares_weights():
    scales = [0.9**step for step in range(8)]
    pipe = StepPipeline(scales)
    calibrator = ForecastCalibrator()
    calibrator.attach(pipe.transformer)
    for _ in range(2):
        pipe(create_cache_backend("none"))
        calibrator.end_request(8)
    calibrator.detach()
    weights = calibrator.fit(0.7)["forecast_weights"]["8"]
    assert set(weights) == {str(count) for count in range(2, 8)}
    schedule = computed_steps(8, 3, 0.7)
    for step, entry in enumerate(weights["3"]):
        if step in schedule:
            assert entry is None
        else:
            last = max(c for c in schedule if c < step)
            assert entry == pytest.approx([0.9 ** (step - last)], rel=1e-5)
    # The fitted weights make the forecast exact on the trajectory they were fitted on.
    for settings in calibrator.candidates().values():
        backend = LearnedCacheBackend.from_config(settings)
        backend.apply(pipe)
        assert pipe(backend, 8 / 3) == pytest.approx(scales, rel=1e-5)
        backend.remove(pipe)
    with pytest.raises(ValueError, match="fitted for another schedule than schedule_power 1"):
        LearnedCacheBackend.from_config({**calibrator.fit(0.7), "schedule_power": 1.0})


def test_calibrator_with_two_outputs_of_history_fits_a_linear_extrapolation():
    scales = [1.0 + step for step in range(10)]  # linear in the step, so two computed outputs extrapolate it
    pipe = StepPipeline(scales)
    calibrator = ForecastCalibrator(history=2, ridge=0.0)
    calibrator.attach(pipe.transformer)
    pipe(create_cache_backend("none"))
    calibrator.end_request(10)
    calibrator.detach()
    # Constant and linear parts are not separable from one trajectory of a constant ray; what matters is that the
    # fitted combination reproduces every skipped output.
    backend = LearnedCacheBackend.from_config(calibrator.fit())
    backend.apply(pipe)
    assert pipe(backend, 3.0)[1:] == pytest.approx(scales[1:], rel=1e-6)


def test_settings_are_strict_and_requests_untrusted():
    with pytest.raises(ValueError, match="valid keys: speedup, schedule_power, forecast_weights"):
        LearnedCacheBackend.from_config({"speedup": 2.0, "thresh": 1})
    for bad in (0.5, float("nan"), True, "3", 10**400):
        with pytest.raises(ValueError, match="speedup must be a number in"):
            LearnedCacheBackend.from_config({"speedup": bad})
    with pytest.raises(ValueError, match="schedule_power must be a number in"):
        LearnedCacheBackend.from_config({"schedule_power": 0})
    for weights in ({"30": {"31": []}}, {"x": {}}, {"4": {"2": [None, [1e9], [1.0], None]}}, {"4": {"2": [None]}}):
        with pytest.raises(ValueError, match="forecast_weights"):
            LearnedCacheBackend.from_config({"forecast_weights": weights})
    backend = LearnedCacheBackend.from_config(None)
    with pytest.raises(CacheSettingsError, match="valid keys for a request: enabled, speedup, quality_target"):
        backend.check_overrides({"forecast_weights": {}})
    with pytest.raises(CacheSettingsError, match="speedup must be a number"):
        backend.check_overrides({"speedup": -1})
    with pytest.raises(CacheSettingsError, match="teaserve calibrate --backend learned"):
        backend.check_overrides({"quality_target": 40})


def test_quality_target_chooses_the_fastest_calibrated_speedup():
    table = {"10": [[1.5, 50.0], [3.0, 41.0], [6.0, 30.0]], "30": [[1.5, 60.0], [3.0, 50.0], [6.0, 42.0]]}
    backend = LearnedCacheBackend.from_config({"quality_table": table})
    pipe = StepPipeline([1.0] * 12)
    backend.apply(pipe)
    backend.begin_request(12, {"quality_target": 40})  # 12 steps: the 10-step table is the nearest
    assert backend.plan.speedup == 3.0
    backend.begin_request(25, {"quality_target": 40})  # the 30-step table
    assert backend.plan.speedup == 6.0
    assert backend.stats()["quality"]["calibrated_psnr_db"] == 42.0
    # A noisy table: 8x scores above 40 dB, but 6x, slower, does not; 8x is never chosen past it.
    noisy = QualityTable.parse({"30": [[6.0, 38.0], [1.5, 60.0], [8.0, 41.0], [3.0, 50.0]]})
    assert noisy.choose(30, 40.0) == (30, 3.0, 50.0) and noisy.choose(30, 30.0) == (30, 8.0, 41.0)
    backend.begin_request(12, {"quality_target": 99})  # nothing reaches it: every step computed
    assert not backend.plan.enabled
    assert backend.stats()["quality"] == {
        "target_db": 99.0,
        "calibrated_steps": 10,
        "speedup": None,
        "calibrated_psnr_db": None,
    }


def _generate(pipe, backend=None, **kwargs):
    """Six steps; with a backend, driven as the engine drives it (the step index from the step callback)."""
    if backend is not None:
        kwargs["callback_on_step_end"] = lambda pipe, step, timestep, tensors: backend.set_step(step + 1) or tensors
    generator = torch.Generator().manual_seed(0)
    return pipe("a cat", num_inference_steps=6, height=32, width=32, generator=generator, **kwargs).images[0]


@pytest.mark.parametrize("build", [tiny_qwen_pipeline, tiny_flux_pipeline], ids=["qwen-image", "flux"])
def test_on_diffusers_pipelines_never_skipping_is_uncached_and_skipping_forecasts(build):
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    cfg = {"true_cfg_scale": 4.0, "negative_prompt": "dark"}
    uncached = pixels(_generate(pipe, **cfg))
    backend = LearnedCacheBackend.from_config(None)
    backend.apply(pipe)
    backend.begin_request(6, {"speedup": 1.0})
    assert np.array_equal(pixels(_generate(pipe, backend, **cfg)), uncached)
    backend.begin_request(6, {"speedup": 2.0})
    skipping = pixels(_generate(pipe, backend, **cfg))
    stats = backend.stats()
    assert set(stats["branches"]) == {"cond", "uncond"}
    # Steps 0, 3 and 5 are computed (the default schedule packs them towards the end).
    assert all(branch["schedule"] == "CSSCSC" for branch in stats["branches"].values())
    assert not np.array_equal(skipping, uncached)
    backend.remove(pipe)
    assert np.array_equal(pixels(_generate(pipe, **cfg)), uncached)


@pytest.fixture(scope="module")
def tiny_bagel(tmp_path_factory):
    from teaserve.pipelines.bagel.testing import build_tiny_bagel

    return build_tiny_bagel(tmp_path_factory.mktemp("tiny-bagel"))


def test_on_bagel_each_branch_forecasts_its_own_calls(tiny_bagel):
    with Omni(model=str(tiny_bagel), cache_backend="learned") as omni:

        def generate(cache):
            params = OmniDiffusionSamplingParams(num_inference_steps=6, seed=3, cache_config=cache)
            return omni.generate("a red cat", params)[0]

        uncached = generate({"enabled": False})
        assert np.array_equal(pixels(generate({"speedup": 1.0}).images[0]), pixels(uncached.images[0]))
        output = generate({"speedup": 2.0})
        branches = output.metrics.cache["branches"]
        assert set(branches) == {"cond", "uncond_text"}
        assert branches["cond"]["schedule"] == "CSSCSC"
        # The text-free branch runs only inside BAGEL's CFG interval; its first call is always computed.
        assert branches["uncond_text"]["schedule"][0] == "C"
        assert not np.array_equal(pixels(output.images[0]), pixels(uncached.images[0]))


def test_on_the_embedded_model_through_the_engine():
    with Omni(cache_backend="learned") as omni:
        params = OmniDiffusionSamplingParams(num_inference_steps=12, seed=0)
        prompt = "a small red circle at the top left on a blue background"
        uncached = omni.generate(prompt, params.replace(cache_config={"enabled": False}))[0]
        cached = omni.generate(prompt, params.replace(cache_config={"speedup": 3.0}))[0]
        stats = cached.metrics.cache
        assert stats["computed_steps"] == 8 and stats["skipped_steps"] == 16  # 4 of 12 steps, both branches
        assert stats["branches"]["cond"]["schedule"] == "CSSSSCSSCSSC"
        difference = np.abs(pixels(cached.images[0]).astype(float) - pixels(uncached.images[0]))
        assert 0 < difference.mean() < 8
