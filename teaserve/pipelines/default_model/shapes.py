"""The procedural data set of the embedded default model, and the checker that reads an image back.

A scene is one shape (circle, square or triangle), small or large, in one of eight colours, at one of nine
positions of a 3x3 grid, on a background of another colour: "a small red circle at the top left on a blue
background". Every scene renders deterministically from a seed; the checker recovers background, colour,
position, size and shape type from the pixels and compares them with a caption.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 50, 180),
    "cyan": (40, 200, 220),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
RADII = {"small": 0.14, "large": 0.21}
"""Radius of the shape's circumscribed circle, as a fraction of the image side."""
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
CELL_CENTRES = (0.23, 0.5, 0.77)
POSITION_JITTER = 0.02
RADIUS_JITTER = 0.05
IMAGE_SIZE = 64
SUPERSAMPLE = 4
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 1234

# Areas relative to r^2 of each shape drawn with circumscribed radius r (square: side r * sqrt(2)).
AREA_FACTORS = {"circle": np.pi, "square": 2.0, "triangle": 3 * np.sqrt(3) / 4}

CAPTION = re.compile(
    r"^a (?P<size>small|large) (?P<colour>\w+) (?P<shape>\w+) (?:at the (?P<position>[\w ]+?)|in the center) "
    r"on an? (?P<background>\w+) background$"
)


@dataclass(frozen=True)
class Scene:
    size: str
    colour: str
    shape: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        match = CAPTION.match(caption.strip().lower())
        if match is None:
            raise ValueError(f"not a shapes caption: {caption!r}; expected e.g. {all_scenes()[0].caption!r}")
        scene = cls(
            size=match["size"],
            colour=match["colour"],
            shape=match["shape"],
            position=match["position"] or "center",
            background=match["background"],
        )
        if scene.colour not in PALETTE or scene.background not in PALETTE or scene.shape not in SHAPES:
            raise ValueError(f"unknown colour or shape in {caption!r}; colours: {COLOURS}, shapes: {SHAPES}")
        if scene.position not in POSITIONS:
            raise ValueError(f"unknown position in {caption!r}; positions: {POSITIONS}")
        return scene


def all_scenes() -> list[Scene]:
    """Every scene whose shape colour differs from its background: 2 x 8 x 3 x 9 x 7 = 3024."""
    return [
        Scene(size, colour, shape, position, background)
        for size, colour, shape, position, background in itertools.product(RADII, COLOURS, SHAPES, POSITIONS, COLOURS)
        if colour != background
    ]


def split_scenes() -> tuple[list[Scene], list[Scene]]:
    """(training scenes, held-out scenes): a fixed 10% is never trained on."""
    scenes = all_scenes()
    random.Random(SPLIT_SEED).shuffle(scenes)
    held_out = int(len(scenes) * HELD_OUT_FRACTION)
    return scenes[held_out:], scenes[:held_out]


def _outline(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]] | tuple:
    if shape == "circle":
        return (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "square":
        half = radius / np.sqrt(2)
        return (cx - half, cy - half, cx + half, cy + half)
    # upward triangle inscribed in the circle of the given radius
    return [(cx, cy - radius), (cx - radius * 0.866, cy + radius * 0.5), (cx + radius * 0.866, cy + radius * 0.5)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, fill) -> None:
    outline = _outline(shape, centre[0], centre[1], radius)
    if shape == "circle":
        draw.ellipse(outline, fill=fill)
    elif shape == "square":
        draw.rectangle(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)


def draw_shape(
    shape: str, colour: str, background: str, centre: tuple[float, float], radius: float, size: int
) -> Image.Image:
    """One shape on a plain background, antialiased by supersampling; `centre` and `radius` (of the shape's
    circumscribed circle) are fractions of the image side."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), PALETTE[background])
    _draw(ImageDraw.Draw(image), shape, (centre[0] * side, centre[1] * side), radius * side, PALETTE[colour])
    return image.resize((size, size), Image.Resampling.BOX)


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw `scene` (antialiased by supersampling); `rng` jitters position and radius slightly."""
    rng = rng or np.random.default_rng(0)
    row, column = divmod(POSITIONS.index(scene.position), 3)
    centre = (
        CELL_CENTRES[column] + rng.uniform(-POSITION_JITTER, POSITION_JITTER),
        CELL_CENTRES[row] + rng.uniform(-POSITION_JITTER, POSITION_JITTER),
    )
    radius = RADII[scene.size] * (1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))
    return draw_shape(scene.shape, scene.colour, scene.background, centre, radius, size)


def sample(count: int, scenes: list[Scene], seed: int, size: int = IMAGE_SIZE) -> tuple[np.ndarray, list[Scene]]:
    """`count` random renders of `scenes` as a uint8 array (count, size, size, 3), with the scene of each."""
    rng = np.random.default_rng(seed)
    chosen = [scenes[i] for i in rng.integers(0, len(scenes), size=count)]
    return np.stack([np.asarray(render(scene, rng, size)) for scene in chosen]), chosen


# -- the checker ---------------------------------------------------------------------------------------------
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
FOREGROUND_DISTANCE = 80.0
"""Pixels farther than this (RGB euclidean) from the background colour belong to the shape."""


def nearest_colour(rgb) -> str:
    """The palette colour closest to an RGB value."""
    return COLOURS[int(np.argmin(((_PALETTE_ARRAY - np.asarray(rgb, np.float32)) ** 2).sum(1)))]


@dataclass(frozen=True)
class Reading:
    """What the checker reads from an image (None where there is no shape to read)."""

    background: str
    colour: str | None
    position: str | None
    size: str | None
    shape: str | None


def _template(shape: str, centre: tuple[float, float], radius: float, size: int) -> np.ndarray:
    side = size * SUPERSAMPLE
    canvas = Image.new("L", (side, side), 0)
    scaled = (centre[0] * SUPERSAMPLE, centre[1] * SUPERSAMPLE)
    _draw(ImageDraw.Draw(canvas), shape, scaled, radius * SUPERSAMPLE, 255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def read(image: Image.Image | np.ndarray) -> Reading:
    """Read background, shape colour, grid position, size and shape type from an image."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = nearest_colour(np.median(border, axis=0))
    distance = np.sqrt(((pixels - np.asarray(PALETTE[background], np.float32)) ** 2).sum(-1))
    mask = distance > FOREGROUND_DISTANCE
    if mask.sum() < 0.005 * height * width:
        return Reading(background, None, None, None, None)
    colour = nearest_colour(np.median(pixels[mask], axis=0))
    ys, xs = np.nonzero(mask)
    centre = (xs.mean() + 0.5, ys.mean() + 0.5)
    row = min(2, int(centre[1] / height * 3))
    column = min(2, int(centre[0] / width * 3))
    # Shape type: the best overlap with each shape drawn with the detected centre and area.
    area = float(mask.sum())
    best, best_iou, best_radius = None, -1.0, 0.0
    for shape in SHAPES:
        radius = np.sqrt(area / AREA_FACTORS[shape])
        template = _template(shape, centre, radius, width) > 0.5
        iou = (template & mask).sum() / max(1, (template | mask).sum())
        if iou > best_iou:
            best, best_iou, best_radius = shape, iou, radius
    threshold = np.sqrt(RADII["small"] * RADII["large"]) * width
    size = "small" if best_radius < threshold else "large"
    return Reading(background, colour, POSITIONS[row * 3 + column], size, best)


ATTRIBUTES = ("background", "colour", "position", "size", "shape")


@dataclass(frozen=True)
class Check:
    """Which attributes of a caption an image gets right."""

    background: bool
    colour: bool
    position: bool
    size: bool
    shape: bool

    @property
    def passed(self) -> bool:
        """Background, shape colour and position right."""
        return self.background and self.colour and self.position

    @property
    def passed_all(self) -> bool:
        """Every attribute right, size and shape type included."""
        return all(asdict(self).values())


def check(image: Image.Image | np.ndarray, caption: str | Scene) -> Check:
    """Compare an image with a caption (or scene)."""
    scene = caption if isinstance(caption, Scene) else Scene.from_caption(caption)
    reading = read(image)
    return Check(**{name: getattr(reading, name) == getattr(scene, name) for name in ATTRIBUTES})
