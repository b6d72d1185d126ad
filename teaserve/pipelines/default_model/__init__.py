"""The embedded default model: what `teaserve serve` and `teaserve generate` run when no model is named.

A small Qwen-Image-architecture pipeline (stock diffusers and transformers classes, bfloat16 weights, 11 MB)
trained on the procedural shapes data set of `shapes` by `train` (`teaserve train-default` retrains it). It draws
64x64 scenes such as "a small red circle at the top left on a blue background".
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
SERVED_MODEL_NAME = "teaserve/shapes-qwen-image"


def default_model_path() -> Path:
    """The folder of the embedded default model, shipped inside the package."""
    return WEIGHTS
