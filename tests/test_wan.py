"""The Wan family end to end: text to video through Omni, its MP4, its parameters and their errors."""

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
    first, second = (np.stack([pixels(frame) for frame in video.frames]) for video in output.videos)
    assert not np.array_equal(first, second)  # each output has its own seed


def test_omni_gives_the_pipelines_own_video(wan, tiny_wan):
    """The request maps onto WanPipeline as the model cards call it: true_cfg_scale is Wan's guidance_scale, the
    default negative prompt is blank; the engine's cached prompt embeddings change nothing."""
    pipe = load_model(str(tiny_wan)).pipeline
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
        frames = np.stack([pixels(frame) for frame in output.videos[0].frames]).astype(int)
        assert np.abs(frames - np.round(expected * 255)).max() <= 1


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"num_frames": 10}, "num_frames must be 1 more than a multiple of 4.*got 10; nearest valid values: 9 or 13"),
        ({"num_frames": 1024}, "nearest valid values: 1021$"),
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
