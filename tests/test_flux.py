"""Flux (text to image, guidance-distilled) and Flux Kontext (edit) end to end, with TeaCache."""

import numpy as np
import pytest
import torch
from conftest import RunningServer, decode_b64_image, pixels, png_bytes
from PIL import Image

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.pipelines import load_model
from teaserve.pipelines.testing import tiny_flux_pipeline
from teaserve.server import build_app

pytestmark = pytest.mark.usefixtures("small_edits")
SOURCE = Image.new("RGB", (40, 56), (200, 40, 40))


@pytest.fixture(scope="module")
def flux(tiny_flux):
    with Omni(model=str(tiny_flux), cache_backend="tea_cache") as omni:
        yield omni


@pytest.fixture(scope="module")
def kontext(tiny_kontext):
    with Omni(model=str(tiny_kontext), cache_backend="tea_cache") as omni:
        yield omni


def run(omni, prompt="a cat", **params):
    params.setdefault("num_inference_steps", 8)
    params.setdefault("seed", 0)
    return omni.generate(prompt, OmniDiffusionSamplingParams(**params))[0]


def edit(omni, **params):
    return run(omni, {"prompt": "make it blue", "multi_modal_data": {"image": SOURCE}}, **params)


def test_flux_text_to_image_size_seed_and_guidance(flux):
    first, again = run(flux, width=48, height=32), run(flux, width=48, height=32)
    assert first.images[0].size == (48, 32)
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))
    other_guidance = run(flux, width=48, height=32, guidance_scale=7.0)  # an input of the distilled transformer
    assert not np.array_equal(pixels(first.images[0]), pixels(other_guidance.images[0]))
    assert first.metrics.transformer_calls == 8  # no true CFG by default


def test_kontext_edit_keeps_the_input_size(kontext):
    output = edit(kontext)
    assert output.images[0].size == (40, 56)
    assert edit(kontext, width=64, height=32).images[0].size == (64, 32)
    assert np.array_equal(pixels(output.images[0]), pixels(edit(kontext).images[0]))


def test_kontext_edit_depends_on_the_input_image(kontext):
    other = Image.new("RGB", SOURCE.size, (40, 40, 200))
    first = edit(kontext, num_inference_steps=2)
    second = run(kontext, {"prompt": "make it blue", "multi_modal_data": {"image": other}}, num_inference_steps=2)
    assert not np.array_equal(pixels(first.images[0]), pixels(second.images[0]))


@pytest.mark.parametrize("fixture", ["flux", "kontext"])
def test_tea_cache_exact_when_never_skipping_and_first_last_only_when_huge(request, fixture):
    omni = request.getfixturevalue(fixture)
    generate = edit if fixture == "kontext" else run
    uncached = generate(omni, cache_config={"enabled": False})
    exact = generate(omni, cache_config={"rel_l1_thresh": 1e-12})
    assert exact.metrics.cache["skipped_steps"] == 0
    assert np.array_equal(pixels(uncached.images[0]), pixels(exact.images[0]))
    huge = generate(omni, cache_config={"rel_l1_thresh": 1e9}, negative_prompt="blurry", true_cfg_scale=3.0)
    branches = huge.metrics.cache["branches"]
    assert {name: branch["schedule"] for name, branch in branches.items()} == {
        "cond": "CSSSSSSC",
        "uncond": "CSSSSSSC",
    }
    assert huge.metrics.transformer_calls == 16


@pytest.mark.parametrize("kind", ["t2i", "kontext"])
def test_reloaded_pipelines_reproduce_outputs(kind, tmp_path):
    pipeline = tiny_flux_pipeline(kind)
    pipeline.set_progress_bar_config(disable=True)
    inputs = {"prompt": "a cat", "num_inference_steps": 3, "height": 32, "width": 32, "output_type": "np"}
    if kind == "kontext":
        inputs.update(image=SOURCE, max_area=32 * 32)

    def generate(pipe):
        return pipe(**inputs, generator=torch.Generator().manual_seed(0)).images

    before = generate(pipeline)
    pipeline.save_pretrained(tmp_path)
    assert np.abs(generate(load_model(str(tmp_path)).pipeline) - before).max() <= 1e-5


def test_flux_and_kontext_over_http(flux, kontext):
    with (
        RunningServer(build_app(flux.engine, shutdown_engine=False)) as t2i,
        RunningServer(build_app(kontext.engine, shutdown_engine=False)) as editing,
    ):
        generated = t2i.client().images.generate(
            prompt="a cat", size="48x32", n=2, extra_body={"num_inference_steps": 4, "guidance_scale": 3.5}
        )
        assert [decode_b64_image(item.b64_json).size for item in generated.data] == [(48, 32)] * 2
        edited = editing.client().images.edit(
            image=("in.png", png_bytes(SOURCE), "image/png"),
            prompt="make it blue",
            extra_body={"num_inference_steps": 4, "cache_config": {"rel_l1_thresh": 1e9}},
        )
        assert decode_b64_image(edited.data[0].b64_json).size == (40, 56)
        assert edited.model_extra["cache"]["branches"]["cond"]["schedule"] == "CSSC"
