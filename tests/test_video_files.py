"""The files of a generated video: an H.264 MP4 that decodes back to its frames, a thumbnail, a spritesheet."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from PIL import Image

from teaserve.engine import GeneratedVideo, decode_mp4


def moving_square(frames: int = 9, size: tuple[int, int] = (48, 32)) -> GeneratedVideo:
    """A white square sliding right over a dark blue background, one step per frame."""
    width, height = size
    images = []
    for index in range(frames):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., 2] = 96
        left = 2 + 4 * index
        pixels[8:24, left : left + 12] = 255
        images.append(Image.fromarray(pixels))
    return GeneratedVideo(images, fps=8)


def test_mp4_is_h264_and_decodes_back_to_the_frames():
    video = moving_square()
    data = video.mp4()
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (48, 32)
    frames, fps = decode_mp4(data)
    assert fps == 8
    assert len(frames) == 9
    for original, decoded in zip(video.frames, frames, strict=True):
        assert decoded.size == original.size
        error = np.abs(np.asarray(decoded, np.float32) - np.asarray(original, np.float32)).mean()
        assert error < 4.0  # lossy, but the same pictures: a shifted square would differ by far more
    centres = [np.nonzero(np.asarray(frame)[..., 0] > 128)[1].mean() for frame in frames]
    assert centres == sorted(centres) and centres[-1] - centres[0] > 25


def test_odd_sides_are_padded_to_what_yuv420_needs():
    video = moving_square(frames=3, size=(33, 17))
    frames, _ = decode_mp4(video.mp4())
    assert [frame.size for frame in frames] == [(34, 18)] * 3


def test_thumbnail_is_the_first_frame():
    video = moving_square()
    assert np.array_equal(np.asarray(video.thumbnail()), np.asarray(video.frames[0]))


@pytest.mark.parametrize(
    ("frames", "grid", "picks"), [(9, (3, 3), list(range(9))), (33, (4, 4), None), (2, (2, 1), [0, 1])]
)
def test_spritesheet_shows_evenly_spaced_frames_row_by_row(frames, grid, picks):
    video = moving_square(frames=frames, size=(16, 8))
    for index, frame in enumerate(video.frames):  # every frame distinguishable by its red value
        pixels = np.asarray(frame).copy()
        pixels[0, 0, 0] = index
        video.frames[index] = Image.fromarray(pixels)
    sheet = np.asarray(video.spritesheet())
    columns, rows = grid
    assert sheet.shape == (rows * 8, columns * 16, 3)
    shown = [int(sheet[row * 8, column * 16, 0]) for row in range(rows) for column in range(columns)]
    expected = picks if picks is not None else [round(i * 32 / 15) for i in range(16)]
    assert shown[: len(expected)] == expected
    assert shown[0] == 0 and expected[-1] == frames - 1
