"""Load BAGEL from the official checkpoint folder (ByteDance-Seed/BAGEL-7B-MoT as published)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .autoencoder import FluxAutoencoder
from .config import AUTOENCODER_FILE, WEIGHTS_FILE, BagelConfig
from .model import BagelModel
from .pipeline import BagelPipeline


def load_weights(module: nn.Module, path: Path, device: torch.device, dtype: torch.dtype) -> None:
    """Load a safetensors file into `module` (built on the meta device): every name must match, both ways."""
    state = {name: tensor.to(dtype) for name, tensor in load_file(str(path), device=str(device)).items()}
    expected = set(module.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match BAGEL's layout: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    module.load_state_dict(state, strict=True, assign=True)
    module.requires_grad_(False).eval()


def load_bagel_pipeline(folder: Path, device: torch.device, dtype: torch.dtype) -> BagelPipeline:
    """Build the network from the folder's configs and weight shapes, then load `ema.safetensors` in `dtype`.

    The autoencoder stays in float32, as in the reference inference code (it is 84 M parameters).
    """
    from transformers import Qwen2Tokenizer

    config = BagelConfig.from_folder(folder)
    with torch.device("meta"):
        model = BagelModel(config)
        vae = FluxAutoencoder(config.autoencoder)
    load_weights(model, folder / WEIGHTS_FILE, device, dtype)
    load_weights(vae, folder / AUTOENCODER_FILE, device, torch.float32)
    return BagelPipeline(model, vae, Qwen2Tokenizer.from_pretrained(str(folder)))
