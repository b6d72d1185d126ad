"""`teaserve calibrate`: one uncached recording shared by every backend, each backend's fit, its quality table, and
one profile that --cache-profile (and TeaCache's coefficients_file) loads."""

import json

import pytest
from fake_backends import CallCounter, ScaledOutput

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.cache import CACHE_BACKENDS, TeaCacheBackend, TeaCacheConfig
from teaserve.evaluation.calibration import calibrate
from teaserve.evaluation.metrics import PSNR_CAP_DB
from teaserve.evaluation.sweeps import tuning_grid
from teaserve.pipelines import load_model

STEP_COUNTS = (3, 4)
PARAMS = OmniDiffusionSamplingParams()


@pytest.fixture
def scaled_output(monkeypatch):
    monkeypatch.setitem(CACHE_BACKENDS, ScaledOutput.name, ScaledOutput)


def test_calibrate_records_once_then_fits_and_measures_every_backend(tiny_qwen, tmp_path, scaled_output):
    model = load_model(str(tiny_qwen))
    calls = []
    model.pipeline.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    calibration = calibrate(model, ["tea_cache", "scaled_output"], ["a red circle"], [], [0], PARAMS, STEP_COUNTS)
    profile = calibration.profile()
    assert [result.name for result in calibration.backends] == ["tea_cache", "scaled_output"]

    # The fake's calibrator saw each uncached request once (one prompt, one seed), 2 transformer calls a step (CFG).
    scaled = profile["cache"]["scaled_output"]
    assert scaled["recorded_calls"] == {"3": [6], "4": [8]}
    # Its quality table: every value of its grid at every step count; scale 0 gives the uncached image.
    grid = tuning_grid(ScaledOutput.tuning_values)
    for steps in ("3", "4"):
        assert [value for value, _ in scaled["quality_table"][steps]] == grid
        psnrs = [psnr for _, psnr in scaled["quality_table"][steps]]
        assert psnrs[0] == PSNR_CAP_DB and psnrs == sorted(psnrs, reverse=True) and psnrs[-1] < 60

    tea = profile["cache"]["tea_cache"]
    assert sorted(tea) == ["coefficients", "quality_table", "x_range"]
    assert [value for value, _ in tea["quality_table"]["4"]] == tuning_grid(TeaCacheBackend.tuning_values)
    assert profile["coefficients"] == tea["coefficients"] and profile["x_range"] == tea["x_range"]
    assert profile["num_inference_steps"] == [3, 4] and profile["transformer"] == "QwenImageTransformer2DModel"

    # The uncached run at each step count happened once, shared by both backends' sweeps; a request is steps x 2
    # transformer calls.
    per_sweep = sum(2 * steps for steps in STEP_COUNTS)
    assert len(calls) == (1 + len(tuning_grid(TeaCacheBackend.tuning_values)) + len(grid)) * per_sweep

    # The profile loads: --cache-profile for both backends, coefficients_file for TeaCache's coefficients.
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    assert TeaCacheConfig.from_profile(path).coefficients == tuple(tea["coefficients"])
    fastest = tea["quality_table"]["4"][-1]
    with Omni(model=model, cache_backend="tea_cache", cache_profile=str(path)) as omni:
        params = OmniDiffusionSamplingParams(num_inference_steps=4, cache_config={"quality_target": fastest[1]})
        (output,) = omni.generate("a cat", params)
        assert output.metrics.cache["quality"]["rel_l1_thresh"] == fastest[0]
        omni.engine.use_cache_backend(omni.engine.create_cache_backend("scaled_output"))
        (output,) = omni.generate("a cat", params.replace(cache_config={"quality_target": 99}))
        assert output.metrics.cache["quality"]["scale"] == 0.0


def test_teacache_validation_keeps_the_best_candidate(tiny_qwen):
    model = load_model(str(tiny_qwen))
    calibration = calibrate(model, ["tea_cache"], ["a red circle"], ["a blue square"], [0], PARAMS, [4])
    profile = calibration.profile()
    scores = profile["validation"]["psnr_by_shrinkage"]
    assert len(scores) > 1 and profile["shrinkage"] == float(max(scores, key=scores.get))
    assert profile["cache"]["tea_cache"]["coefficients"] == profile["coefficients"]
    report = "\n".join(calibration.report())
    assert "validation: mean PSNR" in report and "branch uncond" in report and "quality table" in report


class Unsupported(ScaledOutput):
    name = "unsupported_cache"

    @classmethod
    def calibrator(cls):
        return None

    def apply(self, pipeline) -> None:
        raise ValueError("this transformer is not supported")


class FailingFit(CallCounter):
    def fit(self):
        raise ValueError("nothing to fit on")


class Unfittable(ScaledOutput):
    name = "unfittable_cache"

    @classmethod
    def calibrator(cls):
        return FailingFit()


def test_a_backend_that_does_not_work_here_is_skipped_unless_named(tiny_qwen, monkeypatch):
    for backend in (Unsupported, Unfittable):
        monkeypatch.setitem(CACHE_BACKENDS, backend.name, backend)
    model = load_model(str(tiny_qwen))
    notes = []
    calibration = calibrate(model, None, ["x"], [], [0], PARAMS, [4], log=notes.append)
    assert "unsupported_cache" not in {result.name for result in calibration.backends}
    assert "tea_cache" in {result.name for result in calibration.backends}  # the others go on
    assert "skipping unsupported_cache: ValueError: this transformer is not supported" in notes  # before recording
    assert "skipping unfittable_cache: ValueError: nothing to fit on" in notes  # after it
    with pytest.raises(ValueError, match="not supported"):
        calibrate(model, ["unsupported_cache"], ["x"], [], [0], PARAMS, [4])
    with pytest.raises(ValueError, match="no tuning key to sweep"):
        calibrate(model, ["none"], ["x"], [], [0], PARAMS, [4])
