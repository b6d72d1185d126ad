"""The shapes data set and checker, the training recipe (at toy scale), and calibration."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.pipelines.default_model import default_model_path, shapes
from teaserve.pipelines.default_model.train import TrainingConfig, train


def test_scenes_split_and_captions():
    scenes = shapes.all_scenes()
    assert len(scenes) == 2 * 8 * 3 * 9 * 7 == 3024
    training, held_out = shapes.split_scenes()
    assert len(held_out) == 302 and not set(training) & set(held_out)
    assert shapes.split_scenes() == (training, held_out)  # deterministic
    for scene in scenes[:50] + held_out[:50]:
        assert shapes.Scene.from_caption(scene.caption) == scene
    assert held_out[0].caption.startswith("a ") and held_out[0].caption.endswith(" background")
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.Scene.from_caption("a cat on a sofa")


def test_renders_are_deterministic_and_read_back_exactly():
    training, _ = shapes.split_scenes()
    images, scenes = shapes.sample(300, training, seed=3)
    again, _ = shapes.sample(300, training, seed=3)
    assert np.array_equal(images, again)
    checks = [shapes.check(image, scene) for image, scene in zip(images, scenes, strict=True)]
    assert all(check.passed_all for check in checks)


def test_checker_tolerates_blur_and_notices_each_wrong_attribute():
    scene = shapes.Scene("large", "red", "triangle", "top right", "blue")
    image = shapes.render(scene)
    assert shapes.check(image.filter(ImageFilter.GaussianBlur(1.0)), scene).passed_all
    for attribute, other in [
        ("colour", "green"),
        ("background", "white"),
        ("position", "bottom left"),
        ("size", "small"),
        ("shape", "square"),
    ]:
        result = shapes.check(image, dataclasses.replace(scene, **{attribute: other}))
        assert getattr(result, attribute) is False
        assert all(getattr(result, name) for name in shapes.ATTRIBUTES if name != attribute)
    blank = Image.new("RGB", (64, 64), shapes.PALETTE["blue"])
    assert shapes.check(blank, scene) == shapes.Check(True, False, False, False, False)


def test_training_recipe_at_toy_scale_is_deterministic_and_gives_a_loadable_pipeline(tmp_path):
    config = dataclasses.replace(TrainingConfig().scaled(0.002), layers=1, transformer_batch=4, vae_batch=2)
    folder = train(config, tmp_path / "model", log=lambda message: None)
    again = train(config, tmp_path / "again", log=lambda message: None)
    for weights in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert (folder / weights).read_bytes() == (again / weights).read_bytes()
    assert json.loads((folder / "training.json").read_text())["bfloat16_fidelity"]["images"] == 8
    profile = json.loads((folder / "teaserve.json").read_text())
    assert profile["served_model_name"] == "teaserve/shapes-qwen-image"
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "QwenImagePipeline"
    assert json.loads((folder / "training.json").read_text())["config"]["seed"] == 0
    with Omni(model=str(folder)) as omni:
        (output,) = omni.generate(
            shapes.split_scenes()[1][0].caption, OmniDiffusionSamplingParams(num_inference_steps=2)
        )
    assert output.images[0].size == (64, 64) and output.metrics.transformer_calls == 4  # true CFG by default


def test_calibrate_writes_a_profile_that_tea_cache_loads(tmp_path, tiny_qwen):
    profile_path = tmp_path / "profile.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "teaserve",
            "calibrate",
            str(tiny_qwen),
            "--num-prompts",
            "2",
            "--steps",
            "5,8",
            "--seeds",
            "0",
            "--backend",
            "tea_cache",
            "-o",
            str(profile_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "R^2" in result.stdout and "branch uncond" in result.stdout and "8 steps" in result.stdout
    profile = json.loads(profile_path.read_text())
    # prompts x seeds x branches x (steps - 1) pairs, over both step counts
    assert profile["points"] == 2 * 1 * 2 * (4 + 7) and profile["num_inference_steps"] == [5, 8]
    assert sorted(profile["cache"]["tea_cache"]["quality_table"]) == ["5", "8"]
    assert len(profile["coefficients"]) == 5
    low, high = profile["x_range"]
    assert 0 < low < high and {key: len(value["x_range"]) for key, value in profile["by_steps"].items()} == {
        "5": 2,
        "8": 2,
    }
    with Omni(
        model=str(tiny_qwen), cache_backend="tea_cache", cache_config={"coefficients_file": str(profile_path)}
    ) as omni:
        config = omni.engine.cache.config
        assert config.coefficients == tuple(profile["coefficients"]) and config.x_range == (low, high)
        for cache_config in ({"coefficients": [0, 0, 0, 1, 0]}, {"coefficients_file": str(profile_path)}):
            with pytest.raises(ValueError, match="cannot be set per request"):
                omni.generate("x", OmniDiffusionSamplingParams(cache_config=cache_config))
    with pytest.raises(ValueError, match="cannot read coefficients_file"):
        Omni(model=str(tiny_qwen), cache_backend="tea_cache", cache_config={"coefficients_file": "/nonexistent"})
    with pytest.raises(ValueError, match="not both"):
        Omni(
            model=str(tiny_qwen),
            cache_backend="tea_cache",
            cache_config={"coefficients_file": str(profile_path), "coefficients": [0, 0, 0, 1, 0]},
        )


# An earlier calibration at 30 steps only, fitted on gate changes 0.034..0.148: its polynomial goes negative
# above 0.176, so at 12 steps (changes 0.13..0.25) the largest changes once counted as none and steps were skipped.
EARLIER_CALIBRATION = {
    "coefficients": [-5712.29571871, 1493.11886556, -87.59693888, -0.66030614, 0.17680775],
    "x_range": [0.034036, 0.147774],
}


@pytest.mark.parametrize("settings", [None, EARLIER_CALIBRATION], ids=["shipped", "earlier"])
def test_a_threshold_near_zero_computes_every_step_at_any_step_count(settings):
    with Omni(cache_backend="tea_cache", cache_config=settings) as omni:
        for steps in (6, 12, 50):
            params = OmniDiffusionSamplingParams(
                num_inference_steps=steps, seed=0, cache_config={"rel_l1_thresh": 1e-9}
            )
            (output,) = omni.generate(shapes.split_scenes()[1][0].caption, params)
            assert output.metrics.cache["skipped_steps"] == 0, steps
            assert output.metrics.cache["computed_steps"] == 2 * steps


# -- the shipped model --------------------------------------------------------------------------------------------
def test_the_shipped_model_is_small_and_recommends_its_own_settings():
    from teaserve.pipelines.default_model import SERVED_MODEL_NAME

    folder = default_model_path()
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size <= 25 * 1024 * 1024
    profile = json.loads((folder / "teaserve.json").read_text())
    assert profile["served_model_name"] == SERVED_MODEL_NAME
    assert profile["defaults"]["true_cfg_scale"] == 4.0 and profile["defaults"]["negative_prompt"] == " "
    assert len(profile["cache"]["tea_cache"]["coefficients"]) == 5


def test_the_shipped_model_draws_held_out_captions():
    _, held_out = shapes.split_scenes()
    scenes = held_out[:6]
    with Omni(cache_backend="tea_cache") as omni:
        assert omni.model.name == "teaserve/shapes-qwen-image"
        outputs = omni.generate([scene.caption for scene in scenes], OmniDiffusionSamplingParams(seed=0))
        calibrated = omni.engine.cache.config.coefficients
    for output, scene in zip(outputs, scenes, strict=True):
        assert output.images[0].size == (64, 64) and output.metrics.steps == 30
        assert output.metrics.transformer_calls == 60  # true CFG with the blank negative prompt by default
        assert shapes.check(output.images[0], scene).passed_all, scene.caption
    profile = json.loads((default_model_path() / "teaserve.json").read_text())
    assert list(calibrated) == profile["cache"]["tea_cache"]["coefficients"]
