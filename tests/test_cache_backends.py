"""first_block_cache, mag_cache and taylorseer: diffusers' caches on the families' cache targets, through the engine.

Each method's largest setting has a schedule its rule fixes exactly, so the tests check the schedules per CFG
branch, count independently how often the last block really ran, and compare pixels with the uncached image of the
same model (loaded once per family; every engine takes its backend off again when it closes).
"""

import ast
import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from conftest import pixels
from PIL import Image

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.cache import CacheSettingsError, MagRatioCalibrator, cache_target_for, create_cache_backend
from teaserve.pipelines import LoadedModel, load_model

BACKENDS = ("first_block_cache", "mag_cache", "taylorseer")
STEPS = 6
NEVER_SKIPS = {
    "first_block_cache": {"threshold": 0},
    "mag_cache": {"max_skip_steps": 0},
    "taylorseer": {"cache_interval": 1},
}
LARGEST = {
    "first_block_cache": {"threshold": 1e9},
    "mag_cache": {"threshold": 1e9, "max_skip_steps": 10_000},
    "taylorseer": {"cache_interval": 1000},
}  # fmt: skip
ONES = {"mag_ratios": [1.0] * 10}
"""Magnitude ratios of a stack whose residual never changes: MagCache's error stays 0."""


def largest_schedule(backend: str, steps: int) -> str:
    """The schedule of a branch called at every step, at the backend's LARGEST setting and default settings."""
    if backend == "first_block_cache":  # only the first step has no earlier residual to compare with
        return "C" + "S" * (steps - 1)
    if backend == "mag_cache":  # the first 20% (rounded, at least one step) are retained
        retained = max(1, int(0.2 * steps + 0.5))
        return "C" * retained + "S" * (steps - retained)
    # three warm-up steps, then one step in every cache_interval from the fifth on
    return "CCCSC" + "S" * (steps - 5)


class BlockRuns:
    """Counts how often the blocks' attention ran, the last block's and all of them: the work a skipped step saves
    (BAGEL's context prefill runs them too, outside the steps)."""

    def __init__(self, transformer):
        blocks = cache_target_for(transformer).block_stack(transformer)
        self.last = self.all = 0
        for index, block in enumerate(blocks):
            attention = getattr(block, "attn", None) or block.self_attn
            attention.register_forward_hook(self._last_ran if index == len(blocks) - 1 else self._ran)

    def _ran(self, module, args, output):
        self.all += 1

    def _last_ran(self, module, args, output):
        self.last += 1
        self.all += 1

    def take(self) -> tuple[int, int]:
        """(last block runs, block runs) since the last take."""
        counts = (self.last, self.all)
        self.last = self.all = 0
        return counts


def block_evaluations(backend: str, num_blocks: int, schedule: str) -> int:
    """First Block Cache runs the first block at a skipped step too; the others run no block then."""
    return num_blocks * schedule.count("C") + (backend == "first_block_cache") * schedule.count("S")


@dataclass
class Family:
    model: LoadedModel
    runs: BlockRuns
    uncached: Any = None

    @classmethod
    def load(cls, folder) -> "Family":
        model = load_model(str(folder))
        return cls(model, BlockRuns(model.pipeline.transformer))


@contextlib.contextmanager
def engine(family: Family, backend="none", config=None):
    """An engine on the family's loaded model; its backend's hooks come off when it closes."""
    omni = Omni(model=family.model, cache_backend=backend, cache_config=config)
    try:
        yield omni
    finally:
        omni.close()
        omni.engine.cache.remove(family.model.pipeline)


def hook_names(transformer) -> set[str]:
    return {
        name
        for module in transformer.modules()
        if hasattr(module, "_diffusers_hook")
        for name in module._diffusers_hook.hooks
    }


# -- tiny Qwen-Image -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    family = Family.load(tiny_qwen)
    with engine(family) as omni:
        family.uncached = generate(omni)
    return family


def generate(omni, cache_config=None, steps=STEPS, seed=5, prompt="a cat", **params):
    params = OmniDiffusionSamplingParams(num_inference_steps=steps, seed=seed, cache_config=cache_config, **params)
    return omni.generate(prompt, params)[0]


def same_pixels(output, reference) -> bool:
    return np.array_equal(pixels(output.images[0]), pixels(reference.images[0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_largest_setting_skips_by_the_rule_in_each_branch_and_the_counts_are_real(qwen, backend):
    config = ONES if backend == "mag_cache" else None
    with engine(qwen, backend, config) as omni:
        qwen.runs.take()
        output = generate(omni, LARGEST[backend])
        runs = qwen.runs.take()
    cache = output.metrics.cache
    expected = largest_schedule(backend, STEPS)
    assert {name: branch["schedule"] for name, branch in cache["branches"].items()} == {
        "cond": expected,
        "uncond": expected,
    }
    for branch in cache["branches"].values():
        assert (branch["computed_steps"], branch["skipped_steps"]) == (expected.count("C"), expected.count("S"))
    assert cache["computed_steps"] == 2 * expected.count("C") and cache["skipped_steps"] == 2 * expected.count("S")
    assert cache["num_blocks"] == len(qwen.model.pipeline.transformer.transformer_blocks)
    assert cache["block_evaluations"] == 2 * block_evaluations(backend, cache["num_blocks"], expected)
    assert runs == (cache["computed_steps"], cache["block_evaluations"])
    assert cache["backend"] == backend and cache["num_steps"] == STEPS and cache["enabled"] is True
    tuning_key = create_cache_backend(backend).tuning_key
    assert cache[tuning_key] == LARGEST[backend][tuning_key]
    assert output.metrics.transformer_calls == 2 * STEPS  # the transformer runs; its block stack is skipped
    assert not same_pixels(output, qwen.uncached)


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_skipping_and_disabled_requests_are_uncached_and_an_override_lasts_one_request(qwen, backend):
    settings = {**(ONES if backend == "mag_cache" else {}), **NEVER_SKIPS[backend]}
    with engine(qwen, backend, settings) as omni:
        never = generate(omni)
        largest = generate(omni, LARGEST[backend])
        disabled = generate(omni, {"enabled": False})
        again = generate(omni)
    assert never.metrics.cache["skipped_steps"] == 0 and never.metrics.cache["computed_steps"] == 2 * STEPS
    assert same_pixels(never, qwen.uncached)
    assert largest.metrics.cache["skipped_steps"] > 0
    assert disabled.metrics.cache["enabled"] is False and disabled.metrics.cache["skipped_steps"] == 0
    assert same_pixels(disabled, qwen.uncached)
    assert again.metrics.cache == never.metrics.cache and same_pixels(again, qwen.uncached)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_request_that_failed_midway_leaves_no_state_behind(qwen, backend):
    # diffusers resets its hooks' state at the end of a pipeline call; a call that raised never got there.
    config = ONES if backend == "mag_cache" else None
    pipe = qwen.model.pipeline
    cache = create_cache_backend(backend, config)
    cache.apply(pipe)
    inputs = {"prompt": "a cat", "negative_prompt": " ", "true_cfg_scale": 4.0, "height": 32, "width": 32}

    def run(callback=None):
        cache.begin_request(STEPS, LARGEST[backend])
        generator = torch.Generator().manual_seed(0)
        return pipe(**inputs, num_inference_steps=STEPS, generator=generator, callback_on_step_end=callback).images[0]

    def fail_at_step_3(pipeline, step, timestep, kwargs):
        if step == 3:
            raise RuntimeError("cancelled")
        return kwargs

    try:
        clean = run()
        with pytest.raises(RuntimeError, match="cancelled"):
            run(fail_at_step_3)
        assert np.array_equal(pixels(run()), pixels(clean))
        assert cache.stats()["branches"]["cond"]["schedule"] == largest_schedule(backend, STEPS)
    finally:
        cache.remove(pipe)


@pytest.mark.parametrize("backend", BACKENDS)
def test_removing_the_backend_takes_every_hook_off_and_restores_the_uncached_output(qwen, backend):
    config = ONES if backend == "mag_cache" else None
    transformer = qwen.model.pipeline.transformer
    before = hook_names(transformer)
    with engine(qwen, backend, config) as omni:
        assert generate(omni, LARGEST[backend]).metrics.cache["skipped_steps"] > 0
        assert hook_names(transformer) > before
    assert hook_names(transformer) == before
    with engine(qwen) as omni:
        assert same_pixels(generate(omni), qwen.uncached)


def test_mag_cache_follows_the_step_count_of_each_request(qwen):
    # diffusers' MagCache counts steps itself: the hooks must be re-made for every new step count.
    with engine(qwen, "mag_cache", ONES) as omni:
        for steps in (10, 6, 4, 10):
            output = generate(omni, LARGEST["mag_cache"], steps=steps)
            assert output.metrics.cache["branches"]["uncond"]["schedule"] == largest_schedule("mag_cache", steps)


def test_mag_cache_skips_within_its_threshold_and_run_limit(qwen):
    # Ratios 1.0 then 1.25: the error is 0 until step 5, then 0.25 after one step and 0.25 + 0.5625 after two.
    ratios = [1.0] * 5 + [1.25] * 5
    with engine(qwen, "mag_cache", {"mag_ratios": ratios, "retention_ratio": 0.1}) as omni:
        schedules = [
            generate(omni, overrides, steps=10).metrics.cache["branches"]["cond"]["schedule"]
            for overrides in ({"max_skip_steps": 2}, {"threshold": 0.3, "max_skip_steps": 10}, {"threshold": 0.2})
        ]
    assert schedules == ["CSSCSCCCCC", "CSSSSSCSCS", "CSSSCCCCCC"]


def test_mag_cache_defaults_to_the_ratios_of_the_transformers_target(qwen):
    from teaserve.pipelines.qwen_image import QWEN_IMAGE_MAG_RATIOS

    transformer = qwen.model.pipeline.transformer
    assert cache_target_for(transformer).defaults["mag_cache"]["mag_ratios"] == QWEN_IMAGE_MAG_RATIOS
    assert len(QWEN_IMAGE_MAG_RATIOS) == 50 and QWEN_IMAGE_MAG_RATIOS[:3] == (1.0, 1.64062, 1.45312)
    # MagCache4QwenImage's setting (E 0.06, K 2, R 0.2) on its ratios interpolated to 20 steps.
    with engine(qwen, "mag_cache") as omni:
        output = generate(omni, {"threshold": 0.06, "max_skip_steps": 2}, steps=20)
    for branch in output.metrics.cache["branches"].values():
        assert branch["schedule"] == "CCCCCCCCCSCSCSSCCCCC"


def test_taylorseer_computes_one_step_in_every_interval_after_the_warm_up(qwen):
    with engine(qwen, "taylorseer", {"disable_cache_before_step": 2}) as omni:
        output = generate(omni, {"cache_interval": 3}, steps=12)
        again = generate(omni, {"cache_interval": 3}, steps=12)
    assert output.metrics.cache["branches"]["cond"]["schedule"] == "CCSCSSCSSCSS"
    assert output.metrics.cache["cache_interval"] == 3 and same_pixels(output, again)


def test_taylorseer_forecasts_the_stack_output_with_the_series_of_its_computed_steps(qwen):
    # The stack's output enters the output norm; on a forecast step it is the first-order series through the last
    # two computed steps. The cond branch is every other call.
    outputs = []
    norm_out = qwen.model.pipeline.transformer.norm_out
    handle = norm_out.register_forward_pre_hook(lambda module, args: outputs.append(args[0].clone()))
    try:
        with engine(qwen, "taylorseer", {"disable_cache_before_step": 2}) as omni:
            output = generate(omni, {"cache_interval": 3}, steps=6)
    finally:
        handle.remove()
    assert output.metrics.cache["branches"]["cond"]["schedule"] == "CCSCSS"
    h = outputs[::2]
    torch.testing.assert_close(h[2], h[1] + (h[1] - h[0]))
    torch.testing.assert_close(h[4], h[3] + (h[3] - h[1]) / 2)
    torch.testing.assert_close(h[5], h[3] + 2 * (h[3] - h[1]) / 2)
    assert not torch.allclose(h[3], h[1] + 2 * (h[1] - h[0]))  # a computed step is not a forecast


def test_a_quality_target_chooses_a_whole_cache_interval(qwen):
    table = {str(STEPS): [[2, 40.0], [4, 30.0], [8, 20.0]]}
    with engine(qwen, "taylorseer", {"quality_table": table}) as omni:
        output = generate(omni, {"quality_target": 25.0})
    cache = output.metrics.cache
    assert cache["cache_interval"] == 4 and isinstance(cache["cache_interval"], int)
    assert cache["quality"]["cache_interval"] == 4.0
    assert cache["branches"]["cond"]["schedule"] == "CCCSCSSSCSSS"[:STEPS]


# -- settings ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backend", "config", "message"),
    [
        ("first_block_cache", {"rel_l1_thresh": 0.2}, r"setting\(s\) \['rel_l1_thresh'\]; valid keys: threshold$"),
        ("first_block_cache", {"threshold": -0.1}, r"threshold must be a number in \[0, 1e\+09\]"),
        ("first_block_cache", {"threshold": 10**400}, r"threshold must be a number in"),
        ("first_block_cache", {"threshold": float("nan")}, r"threshold must be a number in"),
        ("mag_cache", {"K": 2}, r"valid keys: threshold, max_skip_steps, retention_ratio, mag_ratios"),
        ("mag_cache", {"num_inference_steps": 50}, r"unknown mag_cache setting\(s\) \['num_inference_steps'\]"),
        ("mag_cache", {"max_skip_steps": 1.5}, r"max_skip_steps must be an integer in \[0, 10000\]"),
        ("mag_cache", {"retention_ratio": 1.5}, r"retention_ratio must be a number in \[0, 1\]"),
        ("mag_cache", {"mag_ratios": []}, r"must be a list of 1 to 10000 numbers.*calibrate --backend mag_cache"),
        ("mag_cache", {"mag_ratios": [1.0, float("inf")]}, r"mag_ratios must be numbers in \(0, 1000\]"),
        ("mag_cache", {"mag_ratios": [1.0, -1.0]}, r"mag_ratios must be numbers in"),
        ("mag_cache", {"mag_ratios": "1.0"}, r"mag_ratios must be a list"),
        (
            "taylorseer",
            {"interval": 3},
            r"cache_interval, disable_cache_before_step, disable_cache_after_step, max_order$",
        ),
        ("taylorseer", {"cache_interval": 0}, r"cache_interval must be an integer in \[1, 1000\]"),
        ("taylorseer", {"cache_interval": True}, r"cache_interval must be an integer"),
        ("taylorseer", {"disable_cache_before_step": 0}, r"disable_cache_before_step must be an integer in \[1, 1"),
        ("taylorseer", {"max_order": 9}, r"max_order must be an integer in \[0, 4\]"),
        ("taylorseer", {"taylor_factors_dtype": "float16"}, r"unknown taylorseer setting"),
    ],
)
def test_bad_server_settings_name_the_valid_keys(backend, config, message):
    with pytest.raises(ValueError, match=message):
        create_cache_backend(backend, config)


@pytest.mark.parametrize(
    ("backend", "overrides", "message"),
    [
        ("first_block_cache", {"rel_l1_thresh": 0.2}, r"valid keys for a request: enabled, threshold, quality_target"),
        ("first_block_cache", {"threshold": 1e10}, r"cache_config: threshold must be a number in \[0, 1e\+09\]"),
        ("first_block_cache", {"threshold": "x" * 10_000}, r"got 'x{36}\.\.\.$"),
        ("mag_cache", {"mag_ratios": [1.0]}, r"valid keys for a request: enabled, threshold, max_skip_steps, quality"),
        ("mag_cache", {"retention_ratio": 0.5}, r"cannot be set per request with mag_cache"),
        ("mag_cache", {"max_skip_steps": 10**400}, r"cache_config: max_skip_steps must be an integer"),
        ("mag_cache", {"threshold": float("inf")}, r"cache_config: threshold must be a number"),
        ("taylorseer", {"max_order": 2}, r"valid keys for a request: enabled, cache_interval, quality_target"),
        ("taylorseer", {"cache_interval": 2.5}, r"cache_config: cache_interval must be an integer in \[1, 1000\]"),
        ("taylorseer", {"enabled": "no"}, r"'enabled' must be true or false"),
        ("taylorseer", {"quality_target": 30.0}, r"quality_target needs a quality_table for taylorseer"),
        ("mag_cache", {"quality_target": 30.0, "threshold": 0.1}, r"give quality_target or threshold, not both"),
    ],
)
def test_a_request_may_set_only_its_bounded_knobs(backend, overrides, message):
    cache = create_cache_backend(backend)
    with pytest.raises(CacheSettingsError, match=message) as error:
        cache.check_overrides(overrides)
    assert error.value.param == "cache_config"


def test_mag_cache_without_ratios_for_the_transformer_says_how_to_record_them(bagel):
    cache = create_cache_backend("mag_cache")
    message = r"no magnitude ratios for transformer BagelModel: .*`teaserve calibrate --backend mag_cache`"
    with pytest.raises(ValueError, match=message):
        cache.apply(bagel.model.pipeline)
    assert hook_names(bagel.model.pipeline.transformer) == set()


def test_first_block_cache_refuses_a_stack_of_one_block():
    from types import SimpleNamespace

    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=1,
        joint_attention_dim=8, axes_dims_rope=(4, 2, 2),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"first_block_cache needs at least two blocks .* QwenImageTransformer2DModel"):
        create_cache_backend("first_block_cache").apply(SimpleNamespace(transformer=transformer))
    assert hook_names(transformer) == set()


# -- Flux and Flux Kontext -----------------------------------------------------------------------------------------
SOURCE = Image.new("RGB", (40, 56), (200, 40, 40))


@pytest.fixture(scope="module")
def fluxes(tiny_flux, tiny_kontext, small_edits):
    return {"flux": Family.load(tiny_flux), "kontext": Family.load(tiny_kontext)}


def flux_generate(omni, kind, cache_config):
    prompt = {"prompt": "make it blue", "multi_modal_data": {"image": SOURCE}} if kind == "kontext" else "a cat"
    return generate(omni, cache_config, prompt=prompt, seed=0, negative_prompt="blurry", true_cfg_scale=3.0)


@pytest.mark.parametrize("kind", ["flux", "kontext"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_flux_and_kontext_branches(fluxes, kind, backend):
    # Kontext calls the transformer outside cache_context: its calls are named by their order in the step.
    family = fluxes[kind]
    with engine(family, backend) as omni:
        uncached = flux_generate(omni, kind, {"enabled": False})
        never = flux_generate(omni, kind, NEVER_SKIPS[backend])
        family.runs.take()
        largest = flux_generate(omni, kind, LARGEST[backend])
    assert same_pixels(never, uncached) and never.metrics.cache["skipped_steps"] == 0
    expected = largest_schedule(backend, STEPS)
    schedules = {name: branch["schedule"] for name, branch in largest.metrics.cache["branches"].items()}
    assert schedules == {"cond": expected, "uncond": expected}
    cache = largest.metrics.cache
    assert cache["block_evaluations"] == 2 * block_evaluations(backend, cache["num_blocks"], expected)
    assert family.runs.take() == (cache["computed_steps"], cache["block_evaluations"])
    assert not same_pixels(largest, uncached)


# -- BAGEL -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bagel(tmp_path_factory):
    from teaserve.pipelines.bagel.testing import build_tiny_bagel

    return Family.load(build_tiny_bagel(tmp_path_factory.mktemp("tiny-bagel")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bagel_branches_with_text_guidance_on_the_first_steps(bagel, backend):
    from teaserve.pipelines.bagel.pipeline import BagelFlowSchedule

    schedule = BagelFlowSchedule()
    schedule.set_timesteps(STEPS, 3.0)
    guided = sum(0.4 < t <= 1.0 for t in schedule.sigmas[:-1].tolist())
    config = ONES if backend == "mag_cache" else None
    with engine(bagel, backend, config) as omni:
        bagel.runs.take()
        uncached = generate(omni, {"enabled": False}, prompt="a red cat")
        uncached_runs = bagel.runs.take()
        never = generate(omni, NEVER_SKIPS[backend], prompt="a red cat")
        bagel.runs.take()
        largest = generate(omni, LARGEST[backend], prompt="a red cat")
        largest_runs = bagel.runs.take()
    assert same_pixels(never, uncached) and never.metrics.cache["skipped_steps"] == 0
    branches = largest.metrics.cache["branches"]
    assert branches["cond"]["schedule"] == largest_schedule(backend, STEPS)
    # The text-free branch runs only while guidance is on: the same rule over the steps it runs.
    assert 2 < guided < STEPS and branches["uncond_text"]["schedule"] == largest_schedule(backend, STEPS)[:guided]
    # The context prefill runs the layers too, the same in both requests.
    saved = [uncached_runs[index] - largest_runs[index] for index in range(2)]
    uncached_cache, largest_cache = uncached.metrics.cache, largest.metrics.cache
    assert saved == [
        uncached_cache["computed_steps"] - largest_cache["computed_steps"],
        uncached_cache["block_evaluations"] - largest_cache["block_evaluations"],
    ]
    assert not same_pixels(largest, uncached)


# -- calibration ---------------------------------------------------------------------------------------------------
def test_the_calibrator_records_the_ratios_diffusers_magcache_prints(qwen, capsys):
    from diffusers.hooks import MagCacheConfig

    pipe = qwen.model.pipeline
    calibrator = MagRatioCalibrator()
    calibrator.attach(pipe.transformer)
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=6))
    capsys.readouterr()
    inputs = {"prompt": "a cat", "negative_prompt": " ", "true_cfg_scale": 4.0, "height": 32, "width": 32}
    pipe(**inputs, num_inference_steps=6, generator=torch.Generator().manual_seed(0))
    lines = capsys.readouterr().out.splitlines()
    printed = [ast.literal_eval(line) for line in lines if line.startswith("[") and not line.startswith("[Mag")]
    calibrator.end_request(6)
    pipe(**inputs, num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    calibrator.end_request(4)
    pipe.transformer.disable_cache()  # the hooks put on last come off first (see the next test)
    calibrator.detach()
    assert len(printed) == 2 and printed[0] != printed[1]  # cond, then uncond
    curves = calibrator.curves[6]
    assert len(curves) == 2 and all(len(curve) == 6 for curve in curves)
    assert curves == [pytest.approx(curve, rel=1e-5) for curve in printed]
    assert len(calibrator.curves[4]) == 2
    fitted = calibrator.fit()["mag_ratios"]  # the largest step count, averaged over the branches
    assert fitted[0] == 1.0 and fitted[1:] == pytest.approx(list(np.mean(printed, axis=0)[1:]), rel=1e-5)
    assert hook_names(pipe.transformer) == set()


def test_recorders_taken_off_in_the_order_they_were_put_on_leave_a_working_transformer(qwen):
    # diffusers 0.42 relinks a hook with its own forward wrongly when a hook under it is removed: the hooks that
    # name branches work before and after the call instead, so that no removed hook stays in the chain.
    from teaserve.cache import GateRecorder

    transformer = qwen.model.pipeline.transformer
    gates = GateRecorder(transformer)
    calibrator = MagRatioCalibrator()
    calibrator.attach(transformer)
    with engine(qwen) as omni:
        generate(omni)
    gates.remove()
    calibrator.detach()
    assert hook_names(transformer) == set()
    for module in (transformer, *transformer.transformer_blocks):  # no removed hook left in a call chain
        assert module.forward.__func__ is type(module).forward
    with engine(qwen, "mag_cache", ONES) as omni:
        largest = generate(omni, LARGEST["mag_cache"])
        disabled = generate(omni, {"enabled": False})
    assert largest.metrics.cache["branches"]["uncond"]["schedule"] == largest_schedule("mag_cache", STEPS)
    assert same_pixels(disabled, qwen.uncached)


def test_the_fit_averages_where_each_branch_ran_and_feeds_mag_cache():
    calibrator = MagRatioCalibrator()
    with pytest.raises(ValueError, match="no mag_cache magnitude ratios were recorded"):
        calibrator.fit()
    calibrator.curves = {3: [[1.0, 2.0, 2.0]], 4: [[1.0, 0.5, 0.75, 1.5], [1.0, 1.5], [1.0, 1.0, 1.25, 0.5]]}
    settings = calibrator.fit()
    assert settings == {"mag_ratios": [1.0, 1.0, 1.0, 1.0]}
    assert create_cache_backend("mag_cache", settings).config.mag_ratios == (1.0, 1.0, 1.0, 1.0)
    assert create_cache_backend("mag_cache").calibrator().curves == {}
