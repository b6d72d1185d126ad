"""The clips data set and checker, the shipped video model through diffusers' WanPipeline, and the recipe."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.cli.main import main
from teaserve.engine import decode_mp4
from teaserve.evaluation.prompts import model_prompts
from teaserve.pipelines.default_model import default_model_path
from teaserve.pipelines.default_video_model import SERVED_MODEL_NAME, clips, default_video_model_path
from teaserve.pipelines.default_video_model.train import (
    TrainingConfig,
    build_text_side,
    embed_captions,
    inflate_image_vae,
    reconstruction_quality,
    train,
)


def test_clips_split_and_captions():
    every = clips.all_clips()
    assert len(every) == 8 * 3 * 4 * 7 == 672
    training, held_out = clips.split_clips()
    assert len(held_out) == 67 and not set(training) & set(held_out)
    assert clips.split_clips() == (training, held_out)  # deterministic
    for clip in every:
        assert clips.Clip.from_caption(clip.caption) == clip
    assert clips.Clip("red", "circle", "left to right", "blue").caption == (
        "a red circle moving left to right on a blue background"
    )
    with pytest.raises(ValueError, match="not a clips caption"):
        clips.Clip.from_caption("a cat on a sofa")
    with pytest.raises(ValueError, match="directions"):
        clips.Clip.from_caption("a red circle moving sideways on a blue background")


def test_renders_are_deterministic_and_read_back_exactly():
    training, _ = clips.split_clips()
    videos, chosen = clips.sample(200, training, seed=3)
    assert videos.shape == (200, clips.NUM_FRAMES, clips.FRAME_SIZE, clips.FRAME_SIZE, 3)
    assert np.array_equal(videos, clips.sample(200, training, seed=3)[0])
    assert {clip.direction for clip in chosen} == set(clips.DIRECTIONS)
    assert all(clips.check(video, clip).passed for video, clip in zip(videos, chosen, strict=True))
    # float frames in [0, 1] (a pipeline's "np" output) and PIL frames read the same
    assert clips.read(videos[0] / 255.0) == clips.read([Image.fromarray(frame) for frame in videos[0]])


def test_checker_tolerates_blur_and_notices_each_wrong_attribute():
    clip = clips.Clip("yellow", "triangle", "bottom to top", "white")
    video = clips.render(clip, np.random.default_rng(1))
    blurred = np.stack([np.asarray(Image.fromarray(f).filter(ImageFilter.GaussianBlur(1.0))) for f in video])
    assert clips.check(blurred, clip).passed
    for attribute, other in [("colour", "red"), ("background", "black"), ("direction", "top to bottom")]:
        result = clips.check(video, dataclasses.replace(clip, **{attribute: other}))
        assert getattr(result, attribute) is False
        assert all(getattr(result, name) for name in clips.ATTRIBUTES if name != attribute)
    still = np.repeat(video[:1], clips.NUM_FRAMES, axis=0)
    assert clips.read(still) == clips.Reading("white", "yellow", None)
    blank = np.full_like(video, clips.PALETTE["white"])
    assert clips.read(blank) == clips.Reading("white", None, None)
    reversed_in_time = video[::-1]
    assert clips.read(reversed_in_time).direction == "top to bottom"


# -- the shipped model --------------------------------------------------------------------------------------------
def test_the_shipped_model_is_small_and_recommends_its_own_settings():
    folder = default_video_model_path()
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    assert size <= 25 * 1024 * 1024
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "WanPipeline"
    profile = json.loads((folder / "teaserve.json").read_text())
    assert profile["served_model_name"] == SERVED_MODEL_NAME == "teaserve/shapes-wan"
    defaults = profile["defaults"]
    assert defaults["negative_prompt"] == " " and defaults["true_cfg_scale"] > 1
    assert (defaults["width"], defaults["height"]) == (clips.FRAME_SIZE, clips.FRAME_SIZE)
    assert (defaults["num_frames"], defaults["fps"]) == (clips.NUM_FRAMES, clips.FPS)
    evaluation = json.loads((folder / "evaluation.json").read_text())
    assert evaluation["held_out"] == 67
    # what docs/video-model.md reports: backgrounds and colours right, directions not learned (see there)
    assert evaluation["background"] >= 0.95 and evaluation["colour"] >= 0.9


def test_the_shipped_model_draws_held_out_captions_through_diffusers():
    from diffusers import WanPipeline

    folder = default_video_model_path()
    pipeline = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    defaults = json.loads((folder / "teaserve.json").read_text())["defaults"]
    assert pipeline.transformer.dtype == torch.float32
    assert (pipeline.vae_scale_factor_spatial, pipeline.vae_scale_factor_temporal) == (4, 4)
    _, held_out = clips.split_clips()
    chosen = held_out[:4]
    calls = []
    pipeline.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    videos = pipeline(
        prompt=[clip.caption for clip in chosen],
        negative_prompt=[defaults["negative_prompt"]] * len(chosen),
        guidance_scale=defaults["true_cfg_scale"],
        num_inference_steps=defaults["num_inference_steps"],
        width=defaults["width"],
        height=defaults["height"],
        num_frames=defaults["num_frames"],
        output_type="np",
        generator=[torch.Generator().manual_seed(index) for index in range(len(chosen))],
    ).frames
    assert videos.shape == (4, clips.NUM_FRAMES, clips.FRAME_SIZE, clips.FRAME_SIZE, 3)
    assert len(calls) == 2 * defaults["num_inference_steps"]  # classifier-free guidance: cond and uncond
    checks = [clips.check(video, clip) for video, clip in zip(videos, chosen, strict=True)]
    assert all(check.background for check in checks) and sum(check.colour for check in checks) >= 3


def test_the_embedded_video_model_serves_by_name_with_its_calibrated_teacache():
    _, held_out = clips.split_clips()
    clip = held_out[1]
    with Omni(model=SERVED_MODEL_NAME, cache_backend="tea_cache") as omni:
        assert omni.model.name == SERVED_MODEL_NAME
        (output,) = omni.generate(clip.caption, OmniDiffusionSamplingParams(seed=1))
        calibrated = omni.engine.cache.config.coefficients
    (video,) = output.videos
    assert (len(video.frames), video.fps, video.width, video.height) == (17, 8, 32, 32)
    assert output.metrics.steps == 25
    frames, fps = decode_mp4(video.mp4())
    assert len(frames) == 17 and fps == 8 and frames[0].size == (32, 32)
    profile = json.loads((default_video_model_path() / "teaserve.json").read_text())
    assert list(calibrated) == profile["cache"]["tea_cache"]["coefficients"]
    prompts, checker = model_prompts(SERVED_MODEL_NAME, held_out=True)
    assert prompts == [held.caption for held in held_out] and checker is not None
    assert checker(clip.caption, video.frames) == clips.check(video.frames, clip).passed


# -- the recipe -----------------------------------------------------------------------------------------------------
TOY = dataclasses.replace(TrainingConfig().scaled(0.001), latent_pool=8, layers=1, transformer_batch=4)


def test_the_text_embeddings_tell_swapped_words_apart():
    """Wan's cross-attention sees the caption's token embeddings as a set: captions whose words only swap places
    must give sets as far apart as captions with another colour do."""
    from diffusers import WanPipeline

    tokenizer, text_encoder = build_text_side(TrainingConfig())
    pipeline = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=None, transformer=None)
    captions = [
        "a red circle moving left to right on a blue background",
        "a blue circle moving left to right on a red background",  # colours swapped
        "a red circle moving right to left on a blue background",  # direction reversed
        "a green circle moving left to right on a blue background",  # another colour
    ]
    embeddings, _ = embed_captions(pipeline, captions)

    def token_set(embedding: torch.Tensor) -> torch.Tensor:  # what no order of the tokens changes
        tokens = embedding[(embedding != 0).any(-1)]
        return torch.cat([tokens.mean(0), (tokens.T @ tokens).flatten() / len(tokens)])

    sets = [token_set(embedding) for embedding in embeddings]
    swapped, reversed_direction, other_colour = ((sets[0] - other).norm() for other in sets[1:])
    assert swapped > 0.5 * other_colour and reversed_direction > 0.5 * other_colour


def test_the_video_vae_is_the_image_models_vae_inflated_in_time():
    from diffusers import AutoencoderKLQwenImage

    vae = inflate_image_vae()
    image_vae = AutoencoderKLQwenImage.from_pretrained(default_model_path() / "vae", torch_dtype=torch.float32)
    assert (vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (4, 4)
    training, _ = clips.split_clips()
    video = torch.from_numpy(clips.sample(1, training, seed=5)[0]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(video).latent_dist.mode()
        # the first frame goes through the image VAE's own path: the same latent, the same decoded frame
        assert torch.allclose(latents[:, :, :1], image_vae.encode(video[:, :, :1]).latent_dist.mode(), atol=1e-5)
        assert latents.shape == (1, image_vae.config.z_dim, 5, 8, 8)
    quality = reconstruction_quality(vae, count=8)
    assert quality["checker_passed"] == 1.0 and quality["psnr"] > 20


def test_training_recipe_at_toy_scale_is_deterministic_and_gives_a_wan_pipeline(tmp_path):
    from diffusers import WanPipeline

    folder = train(TOY, tmp_path / "model", log=lambda message: None)
    again = train(TOY, tmp_path / "again", log=lambda message: None)
    for weights in (
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert (folder / weights).read_bytes() == (again / weights).read_bytes()
    record = json.loads((folder / "training.json").read_text())
    assert record["config"]["seed"] == 0 and record["bfloat16_fidelity"]["clips"] == 8
    assert set(record["seconds"]) == {"latents", "transformer"}
    assert record["vae_reconstruction"]["checker_passed"] > 0.9
    assert json.loads((folder / "teaserve.json").read_text())["served_model_name"] == "teaserve/shapes-wan"
    pipeline = WanPipeline.from_pretrained(folder, dtype=torch.float32)
    assert pipeline.text_encoder.training is False and pipeline.transformer.dtype == torch.float32
    video = pipeline("a red circle moving left to right on a blue background", num_inference_steps=2, height=32,
                     width=32, num_frames=5, output_type="np").frames  # fmt: skip
    assert video.shape == (1, 5, 32, 32, 3)


def test_train_default_video_command_trains_and_evaluates(tmp_path, capsys):
    command = ["train-default-video", "--out", str(tmp_path / "m"), "--scale", "0.001", "--evaluate", "2"]
    assert main([*command, "--calibration-prompts", "1"]) == 0
    evaluation = json.loads((tmp_path / "m" / "evaluation.json").read_text())
    assert evaluation["held_out"] == 2 and set(evaluation) == {"held_out", *clips.ATTRIBUTES, "passed"}
    assert (tmp_path / "m" / "samples.png").is_file()
    calibrated = json.loads((tmp_path / "m" / "teaserve.json").read_text())["cache"]["tea_cache"]
    assert len(calibrated["coefficients"]) == 5 and calibrated["quality_table"]
    assert "held-out captions (2)" in capsys.readouterr().out
