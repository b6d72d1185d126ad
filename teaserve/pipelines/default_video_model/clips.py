"""The procedural clips of the embedded video model, and the checker that reads a clip back.

A clip is one shape (circle, square or triangle) in one of eight colours moving in a straight line in one of four
directions over a plain background of another colour: "a red circle moving left to right on a blue background".
Every clip renders deterministically from a seed, with a jittered start, size and speed; the checker recovers
background, shape colour and direction from the frames and compares them with a caption.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ..default_model.shapes import COLOURS, FOREGROUND_DISTANCE, PALETTE, SHAPES, draw_shape, nearest_colour

DIRECTIONS = {
    "left to right": (1, 0),
    "right to left": (-1, 0),
    "top to bottom": (0, 1),
    "bottom to top": (0, -1),
}
"""Each direction's unit step in image coordinates (x to the right, y downwards)."""
FRAME_SIZE = 32
NUM_FRAMES = 17
FPS = 8
RADIUS = 0.2
"""Radius of the shape's circumscribed circle, as a fraction of the frame side."""
RADIUS_JITTER = 0.15
TRAVEL = (0.3, 0.45)
"""How far the shape's centre moves over the clip, as a fraction of the frame side."""
CROSS_POSITION = (0.3, 0.7)
"""Where the path runs across the direction of motion, as a fraction of the frame side."""
EDGE_MARGIN = 0.03
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 4321

MIN_TRAVEL = 0.15
"""The least displacement (fraction of the side) the checker reads as motion."""
MIN_SHAPE_PIXELS = 3

CAPTION = re.compile(
    r"^a (?P<colour>\w+) (?P<shape>\w+) moving (?P<direction>[\w ]+?) on an? (?P<background>\w+) background$"
)


@dataclass(frozen=True)
class Clip:
    colour: str
    shape: str
    direction: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"

    @classmethod
    def from_caption(cls, caption: str) -> Clip:
        match = CAPTION.match(caption.strip().lower())
        if match is None:
            raise ValueError(f"not a clips caption: {caption!r}; expected e.g. {all_clips()[0].caption!r}")
        clip = cls(match["colour"], match["shape"], match["direction"], match["background"])
        if clip.colour not in PALETTE or clip.background not in PALETTE or clip.shape not in SHAPES:
            raise ValueError(f"unknown colour or shape in {caption!r}; colours: {COLOURS}, shapes: {SHAPES}")
        if clip.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction in {caption!r}; directions: {tuple(DIRECTIONS)}")
        return clip


def all_clips() -> list[Clip]:
    """Every clip whose shape colour differs from its background: 8 x 3 x 4 x 7 = 672."""
    return [
        Clip(colour, shape, direction, background)
        for colour, shape, direction, background in itertools.product(COLOURS, SHAPES, DIRECTIONS, COLOURS)
        if colour != background
    ]


def split_clips() -> tuple[list[Clip], list[Clip]]:
    """(training clips, held-out clips): a fixed 10% of the captions is never trained on."""
    clips = all_clips()
    random.Random(SPLIT_SEED).shuffle(clips)
    held_out = int(len(clips) * HELD_OUT_FRACTION)
    return clips[held_out:], clips[:held_out]


def render(
    clip: Clip, rng: np.random.Generator | None = None, size: int = FRAME_SIZE, num_frames: int = NUM_FRAMES
) -> np.ndarray:
    """The frames of `clip` as uint8 (num_frames, size, size, 3); `rng` jitters size, path and speed."""
    rng = rng or np.random.default_rng(0)
    radius = RADIUS * (1 + rng.uniform(-RADIUS_JITTER, RADIUS_JITTER))
    travel = rng.uniform(*TRAVEL)
    low = radius + EDGE_MARGIN
    start = rng.uniform(low, 1 - low - travel)  # along the direction of motion, so the shape stays inside
    across = rng.uniform(*CROSS_POSITION)
    dx, dy = DIRECTIONS[clip.direction]
    frames = []
    for index in range(num_frames):
        along = start + travel * index / max(1, num_frames - 1)
        if dx + dy < 0:  # right to left, bottom to top: the same path, mirrored
            along = 1 - along
        centre = (along, across) if dx else (across, along)
        frames.append(np.asarray(draw_shape(clip.shape, clip.colour, clip.background, centre, radius, size)))
    return np.stack(frames)


def sample(
    count: int, clips: list[Clip], seed: int, size: int = FRAME_SIZE, num_frames: int = NUM_FRAMES
) -> tuple[np.ndarray, list[Clip]]:
    """`count` random renders of `clips` as uint8 (count, num_frames, size, size, 3), with the clip of each."""
    rng = np.random.default_rng(seed)
    chosen = [clips[i] for i in rng.integers(0, len(clips), size=count)]
    return np.stack([render(clip, rng, size, num_frames) for clip in chosen]), chosen


# -- the checker ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reading:
    """What the checker reads from a clip (None where there is no shape, or no motion, to read)."""

    background: str
    colour: str | None
    direction: str | None


def _as_frames(frames: np.ndarray | Sequence[Image.Image]) -> np.ndarray:
    """Frames as float RGB 0..255 (F, H, W, 3): uint8 arrays, float arrays in [0, 1] (a pipeline's "np" output)
    or PIL images."""
    if isinstance(frames, np.ndarray):
        if np.issubdtype(frames.dtype, np.floating):
            return frames.astype(np.float32) * 255.0
        return frames.astype(np.float32)
    return np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) for frame in frames])


def read(frames: np.ndarray | Sequence[Image.Image]) -> Reading:
    """Read background (the border), shape colour (pixels far from the background) and direction (the trend of
    the shape's centroid over the frames) from a clip."""
    pixels = _as_frames(frames)
    count, height, width, _ = pixels.shape
    border = np.concatenate(
        [pixels[:, 0].reshape(-1, 3), pixels[:, -1].reshape(-1, 3), pixels[:, :, 0].reshape(-1, 3),
         pixels[:, :, -1].reshape(-1, 3)]
    )  # fmt: skip
    background = nearest_colour(np.median(border, axis=0))
    distance = np.sqrt(((pixels - np.asarray(PALETTE[background], np.float32)) ** 2).sum(-1))
    masks = distance > FOREGROUND_DISTANCE
    visible = [index for index in range(count) if masks[index].sum() >= MIN_SHAPE_PIXELS]
    if len(visible) < count / 2:
        return Reading(background, None, None)
    # the shape's colour from its core: the half of its pixels farthest from the background (edges blend)
    core = masks & (distance >= np.median(distance[masks]))
    colour = nearest_colour(np.median(pixels[core], axis=0))
    centroids = []
    for index in visible:
        ys, xs = np.nonzero(masks[index])
        centroids.append((xs.mean() / width, ys.mean() / height))
    # least-squares slope of the centroid against the frame index, times the clip's length: the displacement
    slope_x, slope_y = np.polyfit(np.asarray(visible, np.float64), np.asarray(centroids), 1)[0]
    displacement = np.array([slope_x, slope_y]) * (count - 1)
    axis = int(np.argmax(np.abs(displacement)))
    if abs(displacement[axis]) < MIN_TRAVEL:
        return Reading(background, colour, None)
    sign = int(np.sign(displacement[axis]))
    step = (sign, 0) if axis == 0 else (0, sign)
    direction = next(name for name, vector in DIRECTIONS.items() if vector == step)
    return Reading(background, colour, direction)


ATTRIBUTES = ("background", "colour", "direction")


@dataclass(frozen=True)
class Check:
    """Which attributes of a caption a clip gets right."""

    background: bool
    colour: bool
    direction: bool

    @property
    def passed(self) -> bool:
        """Every attribute right."""
        return all(asdict(self).values())


def check(frames: np.ndarray | Sequence[Image.Image], caption: str | Clip) -> Check:
    """Compare a clip's frames with a caption (or clip)."""
    clip = caption if isinstance(caption, Clip) else Clip.from_caption(caption)
    reading = read(frames)
    return Check(**{name: getattr(reading, name) == getattr(clip, name) for name in ATTRIBUTES})
