"""The prompts a sweep runs and, for the embedded shapes models, the checker of their captions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..pipelines import default_model, default_video_model
from ..pipelines.default_model import shapes
from ..pipelines.default_video_model import clips
from .metrics import Media

GENERIC_PROMPTS = (
    "a cat sitting on a windowsill at sunset",
    "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table, still life painting",
    "a lighthouse on a rocky coast during a storm",
    "a futuristic city skyline at night with neon lights",
    "a watercolor painting of a fox in a snowy forest",
    "a cup of coffee with latte art, top view",
    "an astronaut riding a horse on the moon",
)

Checker = Callable[[str, Media], bool]
"""(prompt, image or video frames) -> whether it shows what the prompt asks for."""


def check_shapes_caption(prompt: str, image: Media) -> bool:
    assert isinstance(image, Image.Image)
    return shapes.check(image, prompt).passed_all


def check_clips_caption(prompt: str, video: Media) -> bool:
    assert not isinstance(video, Image.Image)
    return clips.check(video, prompt).passed


def model_prompts(
    model_name: str, *, held_out: bool, prompts_file: str | Path | None = None
) -> tuple[list[str], Checker | None]:
    """Every candidate prompt (callers take the first ones) and, for the shapes models, their caption checker.

    The shapes models are benchmarked on captions they never saw in training (`held_out`) and calibrated on
    training captions; other models use `prompts_file` (one prompt per line) or a built-in generic set.
    """
    if prompts_file:
        return [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()], None
    if model_name == default_model.SERVED_MODEL_NAME:
        training, held = shapes.split_scenes()
        return [scene.caption for scene in (held if held_out else training)], check_shapes_caption
    if model_name == default_video_model.SERVED_MODEL_NAME:
        training_clips, held_clips = clips.split_clips()
        return [clip.caption for clip in (held_clips if held_out else training_clips)], check_clips_caption
    return list(GENERIC_PROMPTS), None
