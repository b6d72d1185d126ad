"""The embedded default video model `teaserve/shapes-wan`.

A small Wan2.1-architecture text-to-video pipeline (stock diffusers and transformers classes, bfloat16 weights)
trained on the procedural clips of `clips` by `train` (`teaserve train-default-video` retrains it). It draws
17-frame clips such as "a red circle moving left to right on a blue background".
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
SERVED_MODEL_NAME = "teaserve/shapes-wan"


def default_video_model_path() -> Path:
    """The folder of the embedded default video model, shipped inside the package."""
    return WEIGHTS
