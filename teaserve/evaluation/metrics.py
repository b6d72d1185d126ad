"""Image and video quality against a reference: PSNR (float64) and SSIM, through torchmetrics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP_DB = 100.0
"""Identical images have infinite PSNR; they count as this."""


Media = Image.Image | Sequence[Image.Image]
"""An image, or the frames of a video."""


def _as_tensor(media: Media) -> torch.Tensor:
    frames = [media] if isinstance(media, Image.Image) else list(media)
    return torch.stack(
        [torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.float64)).permute(2, 0, 1) for frame in frames]
    )


def psnr(media: Media, reference: Media) -> float:
    """Peak signal-to-noise ratio in dB over 0..255 pixels (of every frame of a video together), the error summed in
    float64; capped at PSNR_CAP_DB."""
    return min(PSNR_CAP_DB, float(peak_signal_noise_ratio(_as_tensor(media), _as_tensor(reference), data_range=255.0)))


def ssim(media: Media, reference: Media) -> float:
    """Structural similarity (a video's: the mean over its frames)."""
    return float(structural_similarity_index_measure(_as_tensor(media), _as_tensor(reference), data_range=255.0))
