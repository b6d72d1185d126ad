"""first_block_cache, mag_cache and taylorseer on the embedded default model at its 30 steps, through the engine:
each skips a good part of the block stack and its image stays close to the uncached one and shows the caption.

MagCache runs on magnitude ratios recorded here, through the engine, on training captions."""

import pytest

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.cache import MagRatioCalibrator
from teaserve.evaluation.metrics import psnr
from teaserve.pipelines.default_model import shapes

STEPS = 30
TRAINING, HELD_OUT = shapes.split_scenes()
SCENE = HELD_OUT[0]


def params(**settings) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(num_inference_steps=STEPS, seed=0, **settings)


@pytest.fixture(scope="module")
def uncached_and_ratios():
    calibrator = MagRatioCalibrator()
    with Omni(cache_backend="none") as omni:
        (uncached,) = omni.generate(SCENE.caption, params())
        calibrator.attach(omni.model.pipeline.transformer)
        for scene in TRAINING[:2]:
            omni.generate(scene.caption, params())
            calibrator.end_request(STEPS)
        calibrator.detach()
    return uncached.images[0], calibrator.fit()


@pytest.mark.parametrize(
    ("backend", "overrides"),
    [
        ("first_block_cache", {"threshold": 0.2}),
        ("mag_cache", {"threshold": 0.24}),
        ("taylorseer", {"cache_interval": 3}),
    ],
)
def test_skips_a_good_part_of_the_stack_and_stays_close_to_uncached(uncached_and_ratios, backend, overrides):
    uncached, ratios = uncached_and_ratios
    assert len(ratios["mag_ratios"]) == STEPS and ratios["mag_ratios"][0] == 1.0
    settings = ratios if backend == "mag_cache" else None
    with Omni(cache_backend=backend, cache_config=settings) as omni:
        (output,) = omni.generate(SCENE.caption, params(cache_config=overrides))
    cache = output.metrics.cache
    assert set(cache["branches"]) == {"cond", "uncond"}
    assert cache["computed_steps"] + cache["skipped_steps"] == 2 * STEPS
    assert cache["skipped_steps"] >= 2 * STEPS // 3
    assert psnr(output.images[0], uncached) >= 38.0
    assert shapes.check(output.images[0], SCENE).passed_all
