"""The Wan family end to end: text and image to video through Omni, their MP4s, their parameters and errors, and
Wan2.2's two-transformer checkpoints."""

import numpy as np
import pytest
import torch
from conftest import pixels
from PIL import Image

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.engine import decode_mp4
from teaserve.pipelines import load_model
from teaserve.pipelines.testing import build_tiny_wan

SOURCE = Image.new("RGB", (32, 16), (200, 40, 40))


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    return build_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


@pytest.fixture(scope="module")
def wan(tiny_wan):
    with Omni(model=str(tiny_wan)) as omni:
        yield omni


@pytest.fixture(scope="module")
def pipe(tiny_wan):
    return load_model(str(tiny_wan)).pipeline


@pytest.fixture(scope="module")
def wan_i2v(tmp_path_factory):
    with Omni(model=str(build_tiny_wan(tmp_path_factory.mktemp("tiny-wan-i2v"), "i2v"))) as omni:
        yield omni


def animate(omni, image=SOURCE, **params):
    return run(omni, {"prompt": "a cat", "multi_modal_data": {"image": image}}, **params)


def frames_of(video) -> np.ndarray:
    return np.stack([pixels(frame) for frame in video.frames])


def run(omni, prompt="a cat", **params):
    params.setdefault("seed", 0)
    return omni.generate(prompt, OmniDiffusionSamplingParams(**params))[0]


def test_text_to_video_has_the_requested_frames_and_size_and_its_mp4_decodes_back(wan):
    output = run(wan, num_frames=13, width=32, height=16, fps=12)
    assert output.images == []
    [video] = output.videos
    assert (len(video.frames), video.width, video.height, video.fps) == (13, 32, 16, 12)
    frames, rate = decode_mp4(video.mp4())
    assert (len(frames), frames[0].size, rate) == (13, (32, 16), 12.0)
    # Wan's CFG by default: the prompt and the blank negative prompt, each step.
    assert output.metrics.transformer_calls == 2 * 4


def test_profile_defaults_and_one_video_per_output(wan):
    output = run(wan, num_outputs_per_prompt=2)
    assert [(len(video.frames), video.frames[0].size, video.fps) for video in output.videos] == [(9, (16, 16), 8)] * 2
    first, second = (frames_of(video) for video in output.videos)
    assert not np.array_equal(first, second)  # each output has its own seed


def test_omni_gives_the_pipelines_own_video(wan, pipe):
    """The request maps onto WanPipeline as the model cards call it: true_cfg_scale is Wan's guidance_scale, the
    default negative prompt is blank; the engine's cached prompt embeddings change nothing."""
    for scale, calls in ((5.0, 8), (1.0, 4)):
        output = run(wan, true_cfg_scale=scale, width=32, height=16)
        assert output.metrics.transformer_calls == calls
        expected = pipe(
            prompt="a cat",
            negative_prompt="",
            guidance_scale=scale,
            width=32,
            height=16,
            num_frames=9,
            num_inference_steps=4,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
        ).frames[0]
        frames = frames_of(output.videos[0]).astype(int)
        assert np.abs(frames - np.round(expected * 255)).max() <= 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"num_frames": 10}, "num_frames must be 1 \\+ a multiple of 4 for this model, e.g. 9 or 13, got 10"),
        ({"num_frames": 80}, "e.g. 77 or 81, got 80"),
        ({"num_frames": 0}, "num_frames must be an integer in 1..1024"),
        ({"fps": 0}, "fps must be an integer in 1..120"),
        ({"width": 24, "height": 16}, "multiple of 16"),
        ({"layers": 3}, "layers only applies to QwenImageLayeredPipeline"),
    ],
)
def test_bad_parameters_are_refused_naming_them(wan, params, message):
    with pytest.raises(ValueError, match=message) as caught:
        wan.engine.prepare("a cat", OmniDiffusionSamplingParams(**params))
    assert caught.value.param == ("size" if "width" in params else next(iter(params)))


def test_text_to_video_takes_no_input_image(wan):
    with pytest.raises(ValueError, match="takes no input image") as caught:
        wan.engine.prepare({"prompt": "a cat", "multi_modal_data": {"image": SOURCE}})
    assert caught.value.param == "image"


def test_previews_show_the_first_frame(wan, pipe):
    events = []
    request = wan.engine.prepare("a cat", OmniDiffusionSamplingParams(seed=0, width=32, height=16), num_previews=2)
    wan.engine.submit(request, on_progress=events.append, block=True).result()
    previews = [event.previews for event in events if event.previews]
    assert [[image.size for image in preview] for preview in previews] == [[(32, 16)]] * 2
    # Wan's VAE is causal in time: the first latent frame alone decodes to the video's first frame.
    call = {"prompt": "a cat", "width": 32, "height": 16, "num_frames": 9, "num_inference_steps": 2}
    latents = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    video = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="pil").frames[0]
    with torch.no_grad():
        [first] = wan.engine.model.family.decode_preview(pipe, latents, None)
    assert np.array_equal(pixels(first), pixels(video[0]))


def test_image_to_video_starts_from_the_image_at_its_aspect_ratio(wan_i2v):
    output = animate(wan_i2v, num_frames=5)
    [video] = output.videos
    # The profile's 16x16 area at the input's 2:1 aspect ratio, in multiples of 16.
    assert (len(video.frames), video.frames[0].size) == (5, (16, 16))
    wide = animate(wan_i2v, image=Image.new("RGB", (64, 16), (200, 40, 40)), width=64, height=32)
    assert wide.videos[0].frames[0].size == (64, 32)
    frames, _ = decode_mp4(wide.videos[0].mp4())
    assert (len(frames), frames[0].size) == (9, (64, 32))
    other = animate(wan_i2v, image=Image.new("RGB", SOURCE.size, (40, 40, 200)), num_frames=5)
    assert not np.array_equal(frames_of(video), frames_of(other.videos[0]))
    assert output.metrics.transformer_calls == 2 * 4
    tall = animate(wan_i2v, image=Image.new("RGB", (20, 80)), num_frames=1, num_inference_steps=1)
    assert tall.videos[0].frames[0].size == (16, 32)  # 256 pixels at 1:4 in multiples of 16, at least 16


@pytest.mark.parametrize("images", [0, 2])
def test_image_to_video_takes_exactly_one_image(wan_i2v, images):
    prompt = {"prompt": "a cat", "multi_modal_data": {"image": [SOURCE] * images}} if images else "a cat"
    with pytest.raises(ValueError, match="takes 1 to 1 input image") as caught:
        wan_i2v.engine.prepare(prompt)
    assert caught.value.param == "image"


@pytest.mark.parametrize("kind", ["t2v_a14b", "i2v_a14b"])
def test_wan22_two_transformers_share_the_steps_and_tea_cache_hooks_both(kind, tmp_path):
    folder = build_tiny_wan(tmp_path, kind)
    inputs = {"prompt": "a cat", "multi_modal_data": {"image": SOURCE}} if kind == "i2v_a14b" else "a cat"
    coefficients = {"coefficients": [0, 0, 0, 1, 0]}
    with Omni(model=str(folder), cache_backend="tea_cache", cache_config=coefficients) as omni:
        params = {"num_inference_steps": 8, "num_frames": 5}
        uncached = run(omni, inputs, cache_config={"enabled": False}, **params)
        exact = run(omni, inputs, cache_config={"rel_l1_thresh": 1e-9}, **params)
        huge = run(omni, inputs, cache_config={"rel_l1_thresh": 1e9}, **params)
    assert uncached.metrics.transformer_calls == 2 * 8  # both transformers' calls count
    assert np.array_equal(frames_of(uncached.videos[0]), frames_of(exact.videos[0]))
    # Steps 0-3 (timesteps >= 875) run on the first transformer, 4-7 on the second: each computes its first step,
    # the request's last one is computed too.
    for branch in huge.metrics.cache["branches"].values():
        assert branch["schedule"] == branch["planned_schedule"] == "CSSS" + "CSSC"
    with pytest.raises(ValueError, match="transformer_2"):
        Omni(model=str(folder), cache_backend="first_block_cache")
