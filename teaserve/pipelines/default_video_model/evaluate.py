"""How well a clips model draws what its captions ask: checker accuracy per attribute, and a sample sheet."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..loading import MODEL_PROFILE_FILE
from . import clips
from .clips import Check, Clip

SHEET_FRAMES = (0, 4, 8, 12, 16)
"""The frames of each clip the sample sheet shows."""


@dataclass
class Evaluation:
    clips: list[Clip]
    videos: np.ndarray
    """Generated frames, float (N, F, H, W, 3) in [0, 1]."""
    checks: list[Check]

    def accuracy(self) -> dict[str, float]:
        """Fraction right per attribute, plus `passed` (every attribute right)."""
        result = {name: float(np.mean([getattr(c, name) for c in self.checks])) for name in clips.ATTRIBUTES}
        result["passed"] = float(np.mean([c.passed for c in self.checks]))
        return result


def load_pipeline(model: str | Path):
    """The model folder as a diffusers WanPipeline in float32 (bfloat16 convolutions are slow on CPUs)."""
    from diffusers import WanPipeline

    pipeline = WanPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def evaluate(
    model: str | Path,
    items: list[Clip],
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    batch: int = 16,
) -> Evaluation:
    """Generate one clip per caption with the model's default sampling from its teaserve.json (clip i uses seed
    + i) and check it; `steps` and `guidance_scale` override the defaults."""
    pipeline = load_pipeline(model)
    defaults = json.loads((Path(model) / MODEL_PROFILE_FILE).read_text())["defaults"]
    videos = []
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        videos.append(
            pipeline(
                prompt=[clip.caption for clip in chunk],
                negative_prompt=[defaults["negative_prompt"]] * len(chunk),
                guidance_scale=guidance_scale or defaults["true_cfg_scale"],
                num_inference_steps=steps or defaults["num_inference_steps"],
                width=defaults["width"],
                height=defaults["height"],
                num_frames=defaults["num_frames"],
                output_type="np",
                generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))],
            ).frames
        )
    generated = np.concatenate(videos)
    return Evaluation(
        items, generated, [clips.check(video, clip) for video, clip in zip(generated, items, strict=True)]
    )


def sample_sheet(evaluation: Evaluation, path: str | Path, count: int = 32, columns: int = 4, scale: int = 2) -> None:
    """The first `count` clips, each as frames 0, 4, 8, 12 and 16 of a render of its caption (top) above the
    generated clip (bottom), framed green when every attribute is right and red otherwise."""
    items = list(zip(evaluation.clips, evaluation.videos, evaluation.checks, strict=True))[:count]
    side = clips.FRAME_SIZE * scale
    strip = (len(SHEET_FRAMES) * (side + 2), side)
    cell = (strip[0] + 12, 2 * side + 14)
    rows = -(-len(items) // columns)
    sheet = Image.new("RGB", (columns * cell[0], rows * cell[1]), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (clip, video, check) in enumerate(items):
        x, y = (index % columns) * cell[0], (index // columns) * cell[1]
        colour = (30, 170, 60) if check.passed else (220, 40, 40)
        draw.rectangle((x, y, x + cell[0] - 7, y + cell[1] - 7), fill=colour)
        rendered = clips.render(clip)
        generated = np.round(np.clip(video, 0, 1) * 255).astype(np.uint8)
        for row, frames in enumerate((rendered, generated)):
            for position, frame in enumerate(SHEET_FRAMES):
                image = Image.fromarray(frames[frame]).resize((side, side), Image.Resampling.NEAREST)
                sheet.paste(image, (x + 3 + position * (side + 2), y + 3 + row * (side + 2)))
    sheet.save(path)
