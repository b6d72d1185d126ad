"""A tiny random BAGEL written in the official checkpoint layout, offline, in well under a second.

    from teaserve.pipelines.bagel.testing import build_tiny_bagel
    folder = build_tiny_bagel("/tmp/tiny-bagel")
    teaserve serve /tmp/tiny-bagel

The folder holds what `ByteDance-Seed/BAGEL-7B-MoT` holds: `llm_config.json` (Qwen2 fields), `vit_config.json`
(SigLIP fields, one layer more than the weights), `config.json`, the Qwen2 tokenizer files, `ema.safetensors`
(bfloat16, every official parameter name) and `ae.safetensors` (FLUX/BFL names, float32), plus a
teaserve.json profile with small defaults. The shapes are scaled down so that the code paths stay the same:
grouped-query attention, both MoT experts (initialised independently, so routing matters), a 16-channel
latent with 2x2 patches, 8x VAE downsampling. Weights are random (seeded): the images are noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..offline_tokenizers import build_qwen2_tokenizer
from ..testing import TEST_WORDS, write_profile
from .autoencoder import FluxAutoencoder
from .config import (
    AUTOENCODER_FILE,
    LLM_CONFIG_FILE,
    VIT_CONFIG_FILE,
    WEIGHTS_FILE,
    AutoencoderConfig,
    BagelConfig,
    LanguageModelConfig,
    VisionConfig,
)
from .model import BagelModel
from .packing import sincos_2d_table

TINY_MAX_LATENT_SIZE = 8
"""Latent tokens per side: images up to 8 * 16 = 128 px."""
TINY_VIT: dict[str, int | float | str] = {
    "hidden_size": 32,
    "image_size": 224,
    "intermediate_size": 64,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "patch_size": 14,
}
TINY_AUTOENCODER = AutoencoderConfig(channels=32, channel_multipliers=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)


def tiny_tokenizer():
    """Qwen2 BPE trained on the test words, its special tokens right after the learned ones (compact vocab)."""
    return build_qwen2_tokenizer([TEST_WORDS], compact=True)


def tiny_llm_config(tokenizer) -> dict:
    """llm_config.json: the fields of Qwen2.5-7B-Instruct's config.json, with tiny sizes."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": len(tokenizer),
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def build_tiny_bagel(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random BAGEL checkpoint folder in the official layout to `folder` and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    llm_json = tiny_llm_config(tokenizer)
    config = BagelConfig(
        llm=LanguageModelConfig.from_json(llm_json),
        vit=VisionConfig.from_json(TINY_VIT),
        autoencoder=TINY_AUTOENCODER,
        max_latent_size=TINY_MAX_LATENT_SIZE,
        vit_max_num_patch_per_side=int(TINY_VIT["image_size"]) // int(TINY_VIT["patch_size"]),
    )
    torch.manual_seed(seed)
    model = BagelModel(config)
    with torch.no_grad():
        for table in (model.vit_pos_embed, model.latent_pos_embed):
            table.pos_embed.copy_(sincos_2d_table(table.side, config.llm.hidden_size))
    save_file(
        {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()},
        folder / WEIGHTS_FILE,
    )
    save_file(
        {name: tensor.contiguous() for name, tensor in FluxAutoencoder(TINY_AUTOENCODER).state_dict().items()},
        folder / AUTOENCODER_FILE,
    )

    _write_json(folder / LLM_CONFIG_FILE, llm_json)
    _write_json(folder / VIT_CONFIG_FILE, TINY_VIT)
    # config.json is what vLLM-style loaders read; teaserve, like the official code, does not need it.
    _write_json(
        folder / "config.json",
        {
            "architectures": ["BagelForConditionalGeneration"],
            "model_type": "bagel",
            "visual_gen": True,
            "visual_und": True,
            "llm_config": {**llm_json, "qk_norm": True, "layer_module": "Qwen2MoTDecoderLayer"},
            "vit_config": TINY_VIT,
            "vae_config": {"z_channels": TINY_AUTOENCODER.z_channels, "downsample": TINY_AUTOENCODER.downsample},
            "latent_patch_size": config.latent_patch_size,
            "max_latent_size": config.max_latent_size,
            "vit_max_num_patch_per_side": config.vit_max_num_patch_per_side,
            "connector_act": "gelu_pytorch_tanh",
            "interpolate_pos": False,
            "timestep_shift": 1.0,
        },
    )
    tokenizer.save_pretrained(str(folder))
    tokenizer.backend_tokenizer.model.save(str(folder))  # vocab.json + merges.txt, as the official folder has
    write_profile(
        folder,
        served_model_name="teaserve/tiny-bagel",
        defaults={"width": 64, "height": 64, "num_inference_steps": 6},
    )
    return folder
