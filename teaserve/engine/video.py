"""A generated video: its frames, and the files made of them (MP4 through PyAV's bundled FFmpeg, a thumbnail, a
spritesheet)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

SPRITESHEET_FRAMES = 16
"""Frames a spritesheet shows at most, evenly spaced over the video."""


@dataclass
class GeneratedVideo:
    frames: list[Image.Image]
    fps: int

    @property
    def width(self) -> int:
        return self.frames[0].width

    @property
    def height(self) -> int:
        return self.frames[0].height

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps

    def mp4(self, crf: int = 18) -> bytes:
        """The frames as an H.264 MP4 (yuv420p, which every player decodes; odd sides are padded by one pixel)."""
        buffer = io.BytesIO()
        with av.open(buffer, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=self.fps)
            stream.width, stream.height = self.width + self.width % 2, self.height + self.height % 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in self.frames:
                pixels = np.asarray(frame.convert("RGB"))
                pixels = np.pad(pixels, ((0, self.height % 2), (0, self.width % 2), (0, 0)), mode="edge")
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode())
        return buffer.getvalue()

    def thumbnail(self) -> Image.Image:
        """The first frame: what a player shows before it starts."""
        return self.frames[0].convert("RGB")

    def spritesheet(self, count: int = SPRITESHEET_FRAMES) -> Image.Image:
        """Up to `count` frames, evenly spaced from first to last, in a near-square grid read row by row."""
        total = len(self.frames)
        shown = min(count, total)
        picks = [round(index * (total - 1) / max(shown - 1, 1)) for index in range(shown)]
        columns = math.ceil(math.sqrt(shown))
        rows = math.ceil(shown / columns)
        sheet = Image.new("RGB", (columns * self.width, rows * self.height))
        for position, pick in enumerate(picks):
            row, column = divmod(position, columns)
            sheet.paste(self.frames[pick].convert("RGB"), (column * self.width, row * self.height))
        return sheet


def decode_mp4(data: bytes) -> tuple[list[Image.Image], float]:
    """The frames of an MP4 and its frame rate (for checks of what `GeneratedVideo.mp4` wrote)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
    return frames, rate
