"""CogVideoX text to video and image to video (1.0 and 1.5 layouts) end to end: frames, sizes, MP4s, the request
rules, TeaCache with per-checkpoint coefficients, and the other cache methods."""

import dataclasses
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.cache import TeaCacheConfig, apply_teacache, cache_target_for, remove_teacache
from teaserve.engine import InvalidParameterError, decode_mp4
from teaserve.pipelines import PipelineInputs, get_family, load_model
from teaserve.pipelines.cogvideox import TEACACHE_COEFFICIENTS, checkpoint_name
from teaserve.pipelines.loading import write_profile
from teaserve.pipelines.testing import build_tiny_cogvideox, tiny_cogvideox_components, tiny_cogvideox_pipeline

STEPS = 8
RED = Image.new("RGB", (16, 16), (200, 40, 40))


@pytest.fixture(scope="module")
def t2v_folder(tmp_path_factory):
    return build_tiny_cogvideox(tmp_path_factory.mktemp("cogvideox-t2v"), "t2v")


@pytest.fixture(scope="module")
def t2v(t2v_folder):
    with Omni(model=str(t2v_folder), cache_backend="tea_cache") as omni:
        yield omni


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    folder = build_tiny_cogvideox(tmp_path_factory.mktemp("cogvideox-i2v"), "i2v")
    with Omni(model=str(folder), cache_backend="tea_cache") as omni:
        yield omni


def run(omni, prompt="a cat", **params):
    params.setdefault("num_inference_steps", STEPS)
    params.setdefault("seed", 0)
    return omni.generate(prompt, OmniDiffusionSamplingParams(**params))[0]


def from_image(image=RED, prompt="a cat"):
    return {"prompt": prompt, "multi_modal_data": {"image": image}}


def frames_of(video) -> np.ndarray:
    return np.stack([np.asarray(frame.convert("RGB"), dtype=np.int16) for frame in video])


def assert_mp4_holds(video) -> None:
    """The video's MP4 decodes to its frames: as many, as large, at its rate, each nearest to its own frame."""
    frames, rate = decode_mp4(video.mp4())
    assert len(frames) == len(video.frames) and rate == video.fps
    assert {frame.size for frame in frames} == {(video.width, video.height)}
    made, decoded = frames_of(video.frames), frames_of(frames)
    errors = np.abs(made[:, None] - decoded[None]).mean(axis=(2, 3, 4))  # [made frame, decoded frame]
    assert (errors.argmin(axis=0) == np.arange(len(frames))).all()
    assert errors.diagonal().max() < 12  # H.264 at crf 18 on noise


def test_text_to_video_frames_size_and_mp4(t2v):
    output = run(t2v, width=32, height=16, num_outputs_per_prompt=2)
    assert output.images == [] and len(output.videos) == 2
    for video in output.videos:
        assert len(video.frames) == 9 and video.fps == 8 and (video.width, video.height) == (32, 16)
        assert_mp4_holds(video)
    assert not np.array_equal(frames_of(output.videos[0].frames), frames_of(output.videos[1].frames))
    longer = run(t2v, num_frames=17, fps=12)
    assert len(longer.videos[0].frames) == 17 and longer.videos[0].fps == 12
    assert decode_mp4(longer.videos[0].mp4())[1] == 12


def test_the_pipeline_gets_true_cfg_scale_as_guidance_scale_in_one_call_per_step(t2v):
    pipeline = tiny_cogvideox_pipeline("t2v")
    pipeline.set_progress_bar_config(disable=True)

    def reference(guidance_scale):
        return pipeline(
            prompt="a cat",
            negative_prompt="",
            guidance_scale=guidance_scale,
            num_frames=9,
            height=16,
            width=16,
            num_inference_steps=STEPS,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
        ).frames[0]

    guided, unguided = run(t2v), run(t2v, true_cfg_scale=1.0)
    assert guided.metrics.transformer_calls == unguided.metrics.transformer_calls == STEPS  # CFG batched
    # The engine encodes the prompts itself (a batch of one each): equal to the pipeline's up to float rounding.
    assert np.abs(frames_of(guided.videos[0].frames) - frames_of(reference(6.0))).max() <= 2
    assert np.abs(frames_of(unguided.videos[0].frames) - frames_of(reference(1.0))).max() <= 2
    assert np.abs(frames_of(guided.videos[0].frames) - frames_of(unguided.videos[0].frames)).max() > 20


def test_image_to_video_starts_from_the_image(i2v):
    first = run(i2v, from_image())
    video = first.videos[0]
    assert len(video.frames) == 9 and (video.width, video.height) == (16, 16)
    assert_mp4_holds(video)
    other = run(i2v, from_image(Image.new("RGB", (16, 16), (40, 40, 200))))
    assert not np.array_equal(frames_of(video.frames), frames_of(other.videos[0].frames))


@pytest.fixture(scope="module")
def t2v15(tmp_path_factory):
    folder = build_tiny_cogvideox(tmp_path_factory.mktemp("cogvideox15-t2v"), "t2v", version="1.5")
    with Omni(model=str(folder)) as omni:
        yield omni


def test_version_15_pads_its_latent_frames_and_keeps_the_input_aspect_ratio(t2v15, tmp_path):
    video = run(t2v15, width=32, height=16).videos[0]
    assert len(video.frames) == 9 and (video.width, video.height) == (32, 16) and video.fps == 16
    assert_mp4_holds(video)
    folder = build_tiny_cogvideox(tmp_path, "i2v", version="1.5")
    write_profile(folder, defaults={"num_inference_steps": STEPS, "num_frames": 9, "width": 32, "height": 16})
    with Omni(model=str(folder)) as omni:
        landscape = run(omni, from_image(Image.new("RGB", (40, 24), (200, 40, 40)))).videos[0]
        assert len(landscape.frames) == 9 and (landscape.width, landscape.height) == (32, 16)
        portrait = omni.engine.prepare(from_image(Image.new("RGB", (24, 40))), OmniDiffusionSamplingParams())
        assert (portrait.width, portrait.height) == (16, 32)
        square = omni.engine.prepare(from_image(Image.new("RGB", (40, 40))), OmniDiffusionSamplingParams())
        assert (square.width, square.height) == (16, 16)


def test_version_15_folders_default_to_81_frames_at_16_fps(t2v_folder, tmp_path):
    folder = build_tiny_cogvideox(tmp_path, "t2v", version="1.5")
    write_profile(folder, defaults={"num_inference_steps": STEPS})
    assert load_model(str(folder)).knob_defaults == {"num_frames": 81, "fps": 16}
    write_profile(folder, defaults={"fps": 24})  # the folder's own profile goes over the version's defaults
    assert load_model(str(folder)).knob_defaults == {"num_frames": 81, "fps": 24}
    assert load_model(str(t2v_folder)).knob_defaults == {"num_frames": 9}  # 1.0: the family's 8 fps


def invalid(omni, prompt="a cat", **params) -> InvalidParameterError:
    with pytest.raises(InvalidParameterError) as caught:
        omni.engine.prepare(prompt, OmniDiffusionSamplingParams(**params))
    return caught.value


def test_bad_requests_name_the_parameter_and_what_is_valid(t2v, i2v, t2v15):
    error = invalid(t2v, num_frames=13)
    assert error.param == "num_frames" and "1 + a multiple of 8" in str(error) and "9 or 17" in str(error)
    assert "1 or 9" in str(invalid(t2v, num_frames=8))
    assert get_family("CogVideoXPipeline").knobs.frames_for(6, 8) == 49  # 6 seconds at 8 fps
    error = invalid(t2v, width=24, height=16)
    assert error.param == "size" and "multiple of 16" in str(error)
    assert invalid(t2v, from_image()).param == "image"
    assert invalid(i2v).param == "image"
    assert invalid(i2v, {"prompt": "a cat", "multi_modal_data": {"image": [RED, RED]}}).param == "image"
    assert "only 16x16" in str(invalid(i2v, from_image(), width=32, height=16))
    error = invalid(i2v, from_image(), num_frames=17)  # a rule of the loaded checkpoint, not of the family
    assert error.param == "num_frames" and "num_frames must be 9" in str(error)
    assert "at most 32x32" in str(invalid(t2v15, width=48, height=32))


@pytest.mark.parametrize("fixture", ["t2v", "i2v"])
def test_tea_cache_exact_when_never_skipping_and_first_last_only_when_huge(request, fixture):
    omni = request.getfixturevalue(fixture)
    prompt = from_image() if fixture == "i2v" else "a cat"
    uncached = run(omni, prompt, cache_config={"enabled": False})
    exact = run(omni, prompt, cache_config={"rel_l1_thresh": 1e-12})
    assert exact.metrics.cache["skipped_steps"] == 0
    assert np.array_equal(frames_of(uncached.videos[0].frames), frames_of(exact.videos[0].frames))
    huge = run(omni, prompt, cache_config={"rel_l1_thresh": 1e9})
    # CFG runs batched in one call per step: one decision covers both rows, under the context "cond_uncond".
    assert {name: branch["schedule"] for name, branch in huge.metrics.cache["branches"].items()} == {
        "cond_uncond": "CSSSSSSC"
    }
    assert huge.metrics.cache["computed_steps"] == 2 and huge.metrics.transformer_calls == STEPS
    assert not np.array_equal(frames_of(uncached.videos[0].frames), frames_of(huge.videos[0].frames))
    # The gate is the time embedding (TeaCache4CogVideoX's signal): its relative change from step to step.
    pipeline = omni.model.pipeline
    transformer, scheduler = pipeline.transformer, pipeline.scheduler
    scheduler.set_timesteps(STEPS)
    with torch.inference_mode():
        embeddings = [transformer.time_embedding(transformer.time_proj(t[None])) for t in scheduler.timesteps]
    changes = [((now - then).abs().mean() / then.abs().mean()).item() for then, now in itertools.pairwise(embeddings)]
    first, *others = huge.metrics.cache["branches"]["cond_uncond"]["rel_l1"]
    assert first is None and others == pytest.approx(changes, rel=1e-5)


@pytest.mark.parametrize("threshold", [0.6, 1.0])
def test_tea_cache_plans_the_schedule_from_the_timesteps_as_the_online_rule_decides(threshold):
    """CogVideoX's gate is the time embedding alone: the schedule is known before the first step, and equals what
    the rule decides on each call's own gate."""
    pipe = tiny_cogvideox_pipeline("t2v")
    pipe.set_progress_bar_config(disable=True)
    target = cache_target_for(pipe.transformer)
    online_target = dataclasses.replace(target, timestep_gate=None, shortcut=None)
    config = TeaCacheConfig(rel_l1_thresh=threshold, coefficients=(0.0, 0.0, 0.0, 1.0, 0.0))
    results = []
    for target_used, timesteps in ((target, lambda: pipe.scheduler.timesteps), (online_target, None)):
        cache = apply_teacache(
            pipe.transformer, config, target=target_used, num_inference_steps=STEPS, timesteps=timesteps
        )
        try:
            video = pipe(
                "a cat", negative_prompt="", guidance_scale=6.0, height=16, width=16, num_frames=9,
                num_inference_steps=STEPS, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
            ).frames[0]  # fmt: skip
            results.append((frames_of(video), cache.stats()["branches"]["cond_uncond"]))
        finally:
            remove_teacache(pipe.transformer)
    (planned_frames, planned), (online_frames, online) = results
    assert planned["planned_schedule"] == planned["schedule"] and online["planned_schedule"] is None
    assert "S" in planned["schedule"] and "C" in planned["schedule"][1:-1]
    for key in ("schedule", "rel_l1", "accumulated"):
        assert planned[key] == online[key]
    assert np.array_equal(planned_frames, online_frames)


def test_tea_cache_coefficients_follow_the_checkpoint_config():
    published = {  # the transformer configs of the published checkpoints, as far as they tell them apart
        "CogVideoX-2b": {"in_channels": 16, "out_channels": 16, "patch_size_t": None, "rotary": False},
        "CogVideoX-5b": {"in_channels": 16, "out_channels": 16, "patch_size_t": None, "rotary": True},
        "CogVideoX-5b-I2V": {"in_channels": 32, "out_channels": 16, "patch_size_t": None, "rotary": True},
        "CogVideoX1.5-5B": {"in_channels": 16, "out_channels": 16, "patch_size_t": 2, "rotary": True},
        "CogVideoX1.5-5B-I2V": {"in_channels": 32, "out_channels": 16, "patch_size_t": 2, "rotary": True},
    }
    for name, fields in published.items():
        rotary = fields.pop("rotary")
        assert checkpoint_name(SimpleNamespace(use_rotary_positional_embeddings=rotary, **fields)) == name
    assert TEACACHE_COEFFICIENTS["CogVideoX-2b"][0] == -3.10658903e01
    assert TEACACHE_COEFFICIENTS["CogVideoX-5b-I2V"] == TEACACHE_COEFFICIENTS["CogVideoX-5b"]
    assert TEACACHE_COEFFICIENTS["CogVideoX1.5-5B-I2V"][0] == 1.22842302e02
    tiny = {
        ("t2v", "1.0"): "CogVideoX-2b",
        ("i2v", "1.0"): "CogVideoX-5b-I2V",
        ("t2v", "1.5"): "CogVideoX1.5-5B",
        ("i2v", "1.5"): "CogVideoX1.5-5B-I2V",
    }
    for (kind, version), name in tiny.items():
        transformer = tiny_cogvideox_components(kind, version=version)["transformer"]
        recommended = cache_target_for(transformer).recommended(transformer, "tea_cache")
        assert recommended["coefficients"] == TEACACHE_COEFFICIENTS[name]
        teacache = apply_teacache(transformer)
        assert teacache.clock.rescaling.coefficients == TEACACHE_COEFFICIENTS[name]
        remove_teacache(transformer)


def test_other_cache_methods_run_on_cogvideox_or_refuse_clearly(t2v_folder):
    def schedule(backend, config):
        with Omni(model=str(t2v_folder), cache_backend=backend, cache_config=config) as omni:
            output = run(omni)
            assert len(output.videos[0].frames) == 9
            return {name: branch["schedule"] for name, branch in output.metrics.cache["branches"].items()}

    assert schedule("first_block_cache", {"threshold": 1e9}) == {"cond_uncond": "CSSSSSSS"}
    assert "S" in schedule("taylorseer", {"cache_interval": 3})["cond_uncond"]
    assert "S" in schedule("mag_cache", {"mag_ratios": [1.0, 1.0, 1.0, 1.0], "threshold": 1e9})["cond_uncond"]
    with pytest.raises(ValueError, match="mag_cache has no magnitude ratios for transformer CogVideoXTransformer3D"):
        Omni(model=str(t2v_folder), cache_backend="mag_cache")


@pytest.mark.parametrize("fixture", ["t2v", "t2v15"])
def test_previews_are_the_first_frame_of_each_video(request, fixture):
    engine = request.getfixturevalue(fixture).engine
    request = engine.prepare(
        "a cat",
        OmniDiffusionSamplingParams(num_inference_steps=4, seed=0, width=32, height=16, num_outputs_per_prompt=2),
        num_previews=2,
    )
    events = []
    output = engine.submit(request, on_progress=events.append, block=True).result()
    previews = [event.previews for event in events if event.previews]
    assert len(previews) == 2 and all([image.size for image in p] == [(32, 16)] * 2 for p in previews)
    # After the last step: the first frame of each video, decoded alone (the VAE's group norms see only it, so
    # near, not equal to, the frame decoded with the others): of all frames made, its video's first is nearest.
    frames = [
        (index, number, frame) for index, video in enumerate(output.videos) for number, frame in enumerate(video.frames)
    ]
    for index, preview in enumerate(previews[-1]):
        nearest = min(frames, key=lambda made: np.abs(frames_of([preview]) - frames_of([made[2]])).mean())
        assert nearest[:2] == (index, 0)


def test_dynamic_cfg_follows_the_scheduler_the_checkpoint_ships():
    from diffusers import CogVideoXDPMScheduler

    family, pipeline = get_family("CogVideoXPipeline"), tiny_cogvideox_pipeline("t2v")
    inputs = PipelineInputs(
        prompt="a cat",
        negative_prompt="",
        images=[],
        mask=None,
        width=16,
        height=16,
        num_inference_steps=STEPS,
        true_cfg_scale=6.0,
        guidance_scale=None,
        num_outputs=1,
        generators=[torch.Generator().manual_seed(0)],
        extra={"num_frames": 9, "fps": 8},
    )
    assert family.call_kwargs(pipeline, inputs)["use_dynamic_cfg"] is False  # DDIM
    pipeline.scheduler = CogVideoXDPMScheduler.from_config(pipeline.scheduler.config)
    assert family.call_kwargs(pipeline, inputs)["use_dynamic_cfg"] is True
