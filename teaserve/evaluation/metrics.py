"""Image quality against a reference: PSNR (float64) and SSIM, through torchmetrics."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

PSNR_CAP_DB = 100.0
"""Identical images have infinite PSNR; they count as this."""


def _as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64)).permute(2, 0, 1)[None]


def psnr(image: Image.Image, reference: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB over 0..255 pixels, the error summed in float64; capped at PSNR_CAP_DB."""
    return min(PSNR_CAP_DB, float(peak_signal_noise_ratio(_as_tensor(image), _as_tensor(reference), data_range=255.0)))


def ssim(image: Image.Image, reference: Image.Image) -> float:
    return float(structural_similarity_index_measure(_as_tensor(image), _as_tensor(reference), data_range=255.0))
