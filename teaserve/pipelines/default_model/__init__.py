"""The embedded default model: what `teaserve serve` and `teaserve generate` run when no model is named."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "teaserve/tiny-qwen-image"


def cache_dir() -> Path:
    root = os.environ.get("TEASERVE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "teaserve")
    return Path(root).expanduser()


def default_model_path() -> Path:
    """The folder of the default model, built on first use into the cache folder."""
    from .. import testing

    folder = cache_dir() / "default-model" / "tiny-qwen-image-v1"
    if not (folder / "model_index.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename, so concurrent first uses never see a half-written folder.
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
        try:
            testing.build_tiny_qwen_image(staging)
            with contextlib.suppress(OSError):  # another process finished first
                staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder
