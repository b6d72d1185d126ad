"""How well a shapes model draws what its captions ask: checker accuracy per attribute, and a sample grid."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..loading import load_model
from . import shapes


@dataclass
class Evaluation:
    scenes: list[shapes.Scene]
    images: list[Image.Image]
    checks: list[shapes.Check]

    def accuracy(self) -> dict[str, float]:
        """Fraction right per attribute, plus `passed` (background, colour, position) and `passed_all`."""
        result = {name: float(np.mean([getattr(c, name) for c in self.checks])) for name in shapes.ATTRIBUTES}
        result["passed"] = float(np.mean([c.passed for c in self.checks]))
        result["passed_all"] = float(np.mean([c.passed_all for c in self.checks]))
        return result


def evaluate(
    model: str | Path, scenes: list[shapes.Scene], *, steps: int | None = None, seed: int = 0, batch: int = 32
) -> Evaluation:
    """Generate one image per scene with the model's default sampling (image i uses seed + i) and check it."""
    loaded = load_model(str(model))
    pipe, defaults = loaded.pipeline, loaded.defaults
    width, height = loaded.default_size
    images: list[Image.Image] = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        images += pipe(
            prompt=[scene.caption for scene in chunk],
            negative_prompt=[defaults.negative_prompt] * len(chunk),
            true_cfg_scale=defaults.true_cfg_scale,
            num_inference_steps=steps or defaults.num_inference_steps,
            width=width,
            height=height,
            generator=[torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))],
        ).images
    return Evaluation(scenes, images, [shapes.check(image, scene) for image, scene in zip(images, scenes, strict=True)])


def sample_grid(evaluation: Evaluation, path: str | Path, count: int = 32, columns: int = 8, scale: int = 2) -> None:
    """The first `count` scenes as rendered (left) beside the generated image (right), framed green when every
    attribute is right and red otherwise."""
    items = list(zip(evaluation.scenes, evaluation.images, evaluation.checks, strict=True))[:count]
    side = shapes.IMAGE_SIZE * scale
    cell = (2 * side + 12, side + 8)
    rows = -(-len(items) // columns)
    grid = Image.new("RGB", (columns * cell[0], rows * cell[1]), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, (scene, image, check) in enumerate(items):
        x, y = (index % columns) * cell[0], (index // columns) * cell[1]
        colour = (30, 170, 60) if check.passed_all else (220, 40, 40)
        draw.rectangle((x, y, x + cell[0] - 5, y + cell[1] - 5), fill=colour)
        grid.paste(shapes.render(scene).resize((side, side), Image.Resampling.NEAREST), (x + 2, y + 2))
        grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (x + side + 5, y + 2))
    grid.save(path)
