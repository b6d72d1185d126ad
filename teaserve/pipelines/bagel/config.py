"""BAGEL's configuration, read from the official checkpoint folder.

The published folder holds two configuration files, `llm_config.json` (the Qwen2.5-7B-Instruct config) and
`vit_config.json` (the SigLIP vision config); everything else the official loading code hard-codes or takes
from the weights. teaserve does the same, and reads from the tensor shapes what the weights fix anyway:

- the language model always has the MoT layers, q/k RMSNorm and an untied `lm_head` (not in llm_config.json);
- the vision tower uses all but the last SigLIP layer (vit_config.json says 27, the weights hold 26);
- `max_latent_size` and `vit_max_num_patch_per_side` are the sides of the two 2-D position tables in
  `ema.safetensors` (a `config.json` next to them may carry a stale `max_latent_size`, so it is not read);
- the autoencoder (FLUX.1's, with no config file of its own) takes its geometry from `ae.safetensors`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
WEIGHTS_FILE = "ema.safetensors"
AUTOENCODER_FILE = "ae.safetensors"
CHECKPOINT_FILES = (LLM_CONFIG_FILE, VIT_CONFIG_FILE, WEIGHTS_FILE, AUTOENCODER_FILE)
"""The files the official code reads (besides the tokenizer): their presence marks a BAGEL folder."""

# Hard-coded in the official loading code rather than stored in the checkpoint.
LATENT_PATCH_SIZE = 2
FLUX_SCALE_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159


@dataclass(frozen=True)
class LanguageModelConfig:
    """The Qwen2 decoder that BAGEL splits into an understanding and a generation expert."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LanguageModelConfig:
        if data.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{LLM_CONFIG_FILE}: BAGEL's Qwen2 MLP uses silu, got hidden_act {data['hidden_act']!r}")
        # transformers 5 writes rope_theta inside rope_parameters; Qwen2.5's own file has it at the top level.
        rope_theta = data.get("rope_theta") or (data.get("rope_parameters") or {}).get("rope_theta") or 1_000_000.0
        return cls(
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data["num_key_value_heads"],
            vocab_size=data["vocab_size"],
            rope_theta=float(rope_theta),
            rms_norm_eps=data.get("rms_norm_eps", 1e-6),
        )


@dataclass(frozen=True)
class VisionConfig:
    """The SigLIP vision tower (NaViT-style: any image size, patches in a flat sequence)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    """Layers the model runs: one fewer than vit_config.json names (BAGEL takes the penultimate layer)."""
    patch_size: int
    image_size: int
    layer_norm_eps: float = 1e-6

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VisionConfig:
        if data.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"{VIT_CONFIG_FILE}: expected hidden_act gelu_pytorch_tanh, got {data['hidden_act']!r}")
        return cls(
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            num_attention_heads=data["num_attention_heads"],
            num_hidden_layers=data["num_hidden_layers"] - 1,
            patch_size=data["patch_size"],
            image_size=data["image_size"],
            layer_norm_eps=data.get("layer_norm_eps", 1e-6),
        )


@dataclass(frozen=True)
class AutoencoderConfig:
    """The FLUX.1 autoencoder: `channels * multiplier` channels per level, 2x downsampling between levels."""

    channels: int = 128
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    image_channels: int = 3
    scale_factor: float = FLUX_SCALE_FACTOR
    shift_factor: float = FLUX_SHIFT_FACTOR

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multipliers) - 1)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]]) -> AutoencoderConfig:
        """The geometry of an autoencoder from the shapes of its BFL-named weights (`encoder.*`, `decoder.*`)."""
        channels, image_channels = shapes["encoder.conv_in.weight"][:2]
        levels = sorted({int(m.group(1)) for key in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
        blocks = {int(m.group(1)) for key in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
        return cls(
            channels=channels,
            channel_multipliers=tuple(
                shapes[f"encoder.down.{level}.block.0.conv2.weight"][0] // channels for level in levels
            ),
            num_res_blocks=len(blocks),
            z_channels=shapes["decoder.conv_in.weight"][1],
            image_channels=image_channels,
        )


@dataclass(frozen=True)
class BagelConfig:
    llm: LanguageModelConfig
    vit: VisionConfig
    autoencoder: AutoencoderConfig
    max_latent_size: int = 64
    """Side of the latent position table: generated images have at most this many tokens per side."""
    vit_max_num_patch_per_side: int = 70
    latent_patch_size: int = LATENT_PATCH_SIZE

    @property
    def latent_downsample(self) -> int:
        """Pixels per generation token along each side: the VAE's downsampling times the latent patch size."""
        return self.autoencoder.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.autoencoder.z_channels

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample

    @classmethod
    def from_folder(cls, folder: Path) -> BagelConfig:
        folder = Path(folder)
        weight_shapes = tensor_shapes(folder / WEIGHTS_FILE)
        return cls(
            llm=LanguageModelConfig.from_json(json.loads((folder / LLM_CONFIG_FILE).read_text())),
            vit=VisionConfig.from_json(json.loads((folder / VIT_CONFIG_FILE).read_text())),
            autoencoder=AutoencoderConfig.from_shapes(tensor_shapes(folder / AUTOENCODER_FILE)),
            max_latent_size=_grid_side(weight_shapes, "latent_pos_embed.pos_embed"),
            vit_max_num_patch_per_side=_grid_side(weight_shapes, "vit_pos_embed.pos_embed"),
        )


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only."""
    with safe_open(str(path), framework="pt") as file:
        names = file.keys()
        return {name: tuple(file.get_slice(name).get_shape()) for name in names}


def _grid_side(shapes: dict[str, tuple[int, ...]], name: str) -> int:
    rows = shapes[name][0]
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"{WEIGHTS_FILE}: {name} has {rows} rows, not a square grid")
    return side
