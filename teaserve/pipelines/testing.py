"""Tiny random models, built offline in code and saved as complete diffusers folders.

They load through exactly the same path as real checkpoints and run in well under a second on a CPU, which
makes them the fixtures of teaserve's tests and a quick way to try the server without any download:

    from teaserve.pipelines.testing import build_tiny_qwen_image
    folder = build_tiny_qwen_image("/tmp/tiny-qwen")
    teaserve serve /tmp/tiny-qwen

Component configurations follow diffusers' own fast tests; weights are random (seeded), so the images are noise.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .loading import write_profile
from .offline_tokenizers import build_clip_tokenizer, build_qwen2_tokenizer, build_t5_tokenizer

TINY_SIZE = 32
TEST_WORDS = (
    "a cat dog photo of red green blue sky sunset painting squirrel eating burger hello world "
    "test prompt bad quality make it dance monkey"
)


def _eval(*modules):
    # Models built from a config start in train mode (dropout on); from_pretrained gives eval mode.
    for module in modules:
        module.eval()


def tiny_qwen_components(
    *,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 3,
    vae_base_dim: int = 24,
    vae_dim_mult: tuple[int, ...] = (1, 2, 4),
    image_channels: int = 3,
    layered: bool = False,
) -> dict:
    """The five components of a tiny Qwen-Image pipeline (text encoder with the real special-token ids).

    The defaults are diffusers' fast-test configuration; more layers and heads give a transformer-dominated
    model for speed benchmarks. The VAE downsamples 2x per level after the first (`vae_dim_mult` (1, 2, 4, 4)
    downsamples 8x, as Qwen-Image's own VAE does).
    """
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    # Layered pipelines take an RGBA image for latents when its channel count equals z_dim: keep them apart.
    z_dim = 8 if layered else 4
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
        use_layer3d_rope=layered,
        use_additional_t_cond=layered,
    )
    vae = AutoencoderKLQwenImage(
        base_dim=vae_base_dim,
        z_dim=z_dim,
        dim_mult=list(vae_dim_mult),
        num_res_blocks=1,
        temperal_downsample=[False] + [True] * (len(vae_dim_mult) - 2),
        input_channels=image_channels,
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config={
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                "rope_theta": 1000000.0,
            },
            vision_config={
                "depth": 2,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_heads": 2,
                "out_hidden_size": 16,
            },
            hidden_size=16,
            vocab_size=152064,
            vision_end_token_id=151653,
            vision_start_token_id=151652,
            vision_token_id=151654,
        )
    )
    _eval(transformer, vae, text_encoder)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": build_qwen2_tokenizer([TEST_WORDS]),
    }


QWEN_PIPELINES = {
    "t2i": "QwenImagePipeline",
    "edit": "QwenImageEditPipeline",
    "edit_plus": "QwenImageEditPlusPipeline",
    "layered": "QwenImageLayeredPipeline",
}


def tiny_qwen_pipeline(kind: str = "t2i", *, seed: int = 0, **sizes):
    """An in-memory tiny random Qwen-Image pipeline: kind "t2i", "edit", "edit_plus" (2509) or "layered".

    `sizes` go to `tiny_qwen_components` (num_layers, num_attention_heads, vae_base_dim, vae_dim_mult)."""
    import diffusers

    from .qwen_processor import build_processor

    if kind not in QWEN_PIPELINES:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(QWEN_PIPELINES)}")
    layered = kind == "layered"
    components = tiny_qwen_components(seed=seed, image_channels=4 if layered else 3, layered=layered, **sizes)
    if kind != "t2i":
        components["processor"] = build_processor(components["tokenizer"])
    return getattr(diffusers, QWEN_PIPELINES[kind])(**components)


def save_tiny_qwen(pipeline, folder: str | Path, kind: str = "t2i") -> Path:
    """Save a tiny pipeline laid out like a real checkpoint, with a profile of small default sizes.

    Edit checkpoints name transformers' Qwen2VLProcessor in model_index.json, which teaserve loads without
    torchvision where torchvision is missing: the tiny folders are written the same way.
    """
    from .qwen_processor import PROCESSOR_ENTRY

    folder = Path(folder)
    pipeline.save_pretrained(folder)
    if kind != "t2i":
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["processor"] = PROCESSOR_ENTRY
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        for config in (folder / "processor").glob("*.json"):
            data = json.loads(config.read_text())
            if data.get("processor_class"):
                data["processor_class"] = PROCESSOR_ENTRY[1]
                config.write_text(json.dumps(data, indent=2) + "\n")
    defaults = {"width": TINY_SIZE, "height": TINY_SIZE, "num_inference_steps": 8}
    if kind == "layered":
        defaults = {"num_inference_steps": 8, "layers": 2, "resolution": 640}
    suffix = "" if kind == "t2i" else "-" + kind.replace("_", "-")
    write_profile(folder, served_model_name=f"teaserve/tiny-qwen-image{suffix}", defaults=defaults)
    return folder


def build_tiny_qwen_image(folder: str | Path, *, seed: int = 0, **sizes) -> Path:
    """Write a tiny random QwenImagePipeline (text to image) to `folder` and return its path."""
    return save_tiny_qwen(tiny_qwen_pipeline("t2i", seed=seed, **sizes), folder)


def build_tiny_qwen_image_edit(folder: str | Path, *, kind: str = "edit", seed: int = 0) -> Path:
    """Write a tiny random Qwen-Image edit pipeline: kind "edit", "edit_plus" (2509) or "layered"."""
    if kind == "t2i":
        raise ValueError("kind must be an edit kind: edit, edit_plus or layered")
    return save_tiny_qwen(tiny_qwen_pipeline(kind, seed=seed), folder, kind)


def tiny_flux_components(*, seed: int = 0) -> dict:
    """The seven components of a tiny guidance-distilled Flux pipeline (diffusers' fast-test sizes)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,  # legacy value: pooling at the largest id, which the tokenizer gives <|endoftext|>
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            pad_token_id=1,
            vocab_size=1000,
            hidden_act="gelu",
            projection_dim=32,
        )
    )
    text_encoder_2 = T5EncoderModel(  # d_model equals the transformer's joint_attention_dim
        T5Config(
            vocab_size=1000,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    _eval(transformer, text_encoder, text_encoder_2, vae)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": build_clip_tokenizer([TEST_WORDS]),
        "tokenizer_2": build_t5_tokenizer([TEST_WORDS]),
        "transformer": transformer,
        "vae": vae,
    }


def tiny_flux_pipeline(kind: str = "t2i", *, seed: int = 0):
    """An in-memory tiny random Flux pipeline: kind "t2i" (FluxPipeline) or "kontext" (FluxKontextPipeline)."""
    from diffusers import FluxKontextPipeline, FluxPipeline

    classes = {"t2i": FluxPipeline, "kontext": FluxKontextPipeline}
    if kind not in classes:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(classes)}")
    return classes[kind](**tiny_flux_components(seed=seed))


def build_tiny_flux(folder: str | Path, *, kind: str = "t2i", seed: int = 0) -> Path:
    """Write a tiny random Flux pipeline (kind "t2i" or "kontext") to `folder` and return its path."""
    folder = Path(folder)
    tiny_flux_pipeline(kind, seed=seed).save_pretrained(folder)
    name = "teaserve/tiny-flux" + ("-kontext" if kind == "kontext" else "")
    write_profile(
        folder, served_model_name=name, defaults={"width": TINY_SIZE, "height": TINY_SIZE, "num_inference_steps": 8}
    )
    return folder


def _tiny_umt5_encoder():
    """The T5 encoder of diffusers' fast video tests, as the UMT5 that Wan's checkpoints use (vocabulary cut to the
    offline tokenizer's)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(
        UMT5Config(
            vocab_size=1000,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=5,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


WAN_KINDS = {
    "t2v": "WanPipeline",
    "i2v": "WanImageToVideoPipeline",
    "t2v_a14b": "WanPipeline",
    "i2v_a14b": "WanImageToVideoPipeline",
}
"""Wan2.1 text to video; Wan2.1 image to video (with a CLIP image encoder); Wan2.2 A14B text and image to video
(two transformers, the second for the low-noise steps, no image encoder)."""
WAN_BOUNDARY_RATIO = 0.875
"""Where the tiny A14B pipelines switch transformers (Wan2.2 T2V A14B's own): at timestep 875, so that 4 steps
give each transformer 2 with the tiny scheduler, and 8 steps 4."""


def _tiny_wan_transformer(*, image: bool, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        # Image to video: the noise, then the encoded image video and its frame mask.
        in_channels=36 if image else 16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        image_dim=image_dim,
    )


def tiny_wan_components(kind: str = "t2v", *, seed: int = 0) -> dict:
    """The components of a tiny Wan pipeline of `kind` (see WAN_KINDS; diffusers' fast-test sizes)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    if kind not in WAN_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(WAN_KINDS)}")
    image, two_experts = kind.startswith("i2v"), kind.endswith("a14b")
    torch.manual_seed(seed)
    image_encoder_width = 4
    components = {
        "transformer": _tiny_wan_transformer(image=image, image_dim=image_encoder_width if kind == "i2v" else None),
        "vae": AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
        "text_encoder": _tiny_umt5_encoder(),
        "tokenizer": build_t5_tokenizer([TEST_WORDS]),
    }
    if kind == "i2v":
        from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

        components["image_encoder"] = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=image_encoder_width,
                projection_dim=image_encoder_width,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=1,
            )
        )
        # The PIL processor: the default one needs torchvision.
        components["image_processor"] = CLIPImageProcessorPil(crop_size=32, size=32)
    if two_experts:
        components["transformer_2"] = _tiny_wan_transformer(image=image)
        components["boundary_ratio"] = WAN_BOUNDARY_RATIO
    _eval(*(value for value in components.values() if isinstance(value, torch.nn.Module)))
    return components


def tiny_wan_pipeline(kind: str = "t2v", *, seed: int = 0):
    """An in-memory tiny random Wan pipeline of `kind` (see WAN_KINDS)."""
    import diffusers

    components = tiny_wan_components(kind, seed=seed)
    return getattr(diffusers, WAN_KINDS[kind])(**components)


def build_tiny_wan(folder: str | Path, kind: str = "t2v", *, seed: int = 0) -> Path:
    """Write a tiny random Wan pipeline of `kind` (see WAN_KINDS) to `folder`, with a profile of small defaults
    (16x16, 9 frames at 8 fps, 4 steps), and return its path."""
    folder = Path(folder)
    tiny_wan_pipeline(kind, seed=seed).save_pretrained(folder)
    defaults = {"width": 16, "height": 16, "num_inference_steps": 4, "num_frames": 9, "fps": 8}
    write_profile(folder, served_model_name=f"teaserve/tiny-wan-{kind.replace('_', '-')}", defaults=defaults)
    return folder


@contextlib.contextmanager
def small_edit_condition_images(area: int = 64 * 64):
    """Cap the area edit pipelines resize condition images to (about 1024x1024 for Qwen-Image Edit and Flux Kontext,
    640x640 for Layered).

    On a CPU the tiny VAE needs seconds to encode a 1024x1024 condition image; tests that check behaviour, not
    image quality, cap it so that an edit runs in a fraction of a second.
    """
    from diffusers.pipelines.flux import pipeline_flux_kontext as kontext
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as inpaint
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as layered

    originals = {module: module.calculate_dimensions for module in (edit, inpaint, edit_plus, layered)}
    kontext_resolutions = kontext.PREFERRED_KONTEXT_RESOLUTIONS
    edit_plus_sizes = edit_plus.VAE_IMAGE_SIZE, edit_plus.CONDITION_IMAGE_SIZE
    side = int(area**0.5)
    kontext.PREFERRED_KONTEXT_RESOLUTIONS = [(side, side), (side, side * 3 // 4), (side * 3 // 4, side)]
    try:
        for module, original in originals.items():
            module.calculate_dimensions = lambda target, ratio, original=original: original(min(target, area), ratio)
        edit_plus.VAE_IMAGE_SIZE, edit_plus.CONDITION_IMAGE_SIZE = (min(size, area) for size in edit_plus_sizes)
        yield
    finally:
        for module, original in originals.items():
            module.calculate_dimensions = original
        edit_plus.VAE_IMAGE_SIZE, edit_plus.CONDITION_IMAGE_SIZE = edit_plus_sizes
        kontext.PREFERRED_KONTEXT_RESOLUTIONS = kontext_resolutions


# -- CogVideoX ------------------------------------------------------------------------------------------------------
COGVIDEOX_KINDS = {"t2v": "CogVideoXPipeline", "i2v": "CogVideoXImageToVideoPipeline"}
COGVIDEOX_VERSIONS = ("1.0", "1.5")


def tiny_cogvideox_components(kind: str = "t2v", *, version: str = "1.0", seed: int = 0) -> dict:
    """The five components of a tiny CogVideoX pipeline (diffusers' fast-test sizes), laid out like a checkpoint of
    `version`: 1.0 text to video like 2b (sinusoidal positions), image to video like 5b-I2V (rotary positions and
    positional embeddings learned for 16x16 and 9 frames); 1.5 like the 1.5 checkpoints (temporal patches, rotary
    positions up to 32x32, and for image to video the ofs embedding). Two blocks each, so that every cache method
    has a stack to skip."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel, DDIMScheduler
    from transformers import T5Config, T5EncoderModel

    if kind not in COGVIDEOX_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(COGVIDEOX_KINDS)}")
    if version not in COGVIDEOX_VERSIONS:
        raise ValueError(f"unknown version {version!r}; valid versions: {', '.join(COGVIDEOX_VERSIONS)}")
    image_to_video = kind == "i2v"
    layout: dict = {"num_attention_heads": 4, "attention_head_dim": 8, "sample_width": 2, "sample_height": 2}
    if version == "1.5":
        layout = {"num_attention_heads": 2, "attention_head_dim": 16, "sample_width": 4, "sample_height": 4}
        layout.update(patch_size_t=2, patch_bias=False, use_rotary_positional_embeddings=True)
        if image_to_video:
            layout["ofs_embed_dim"] = 2  # added to the time embedding: the same width
    elif image_to_video:
        # Rotary positions need a head width divisible by 16.
        layout.update(num_attention_heads=2, attention_head_dim=16)
        layout.update(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        in_channels=8 if image_to_video else 4,  # image to video: the video's latents and the image's
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        **layout,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8,) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=1103,
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_heads=4,
            num_layers=5,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
    )
    _eval(transformer, vae, text_encoder)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": DDIMScheduler(),
        "text_encoder": text_encoder,
        "tokenizer": build_t5_tokenizer([TEST_WORDS]),
    }


def tiny_cogvideox_pipeline(kind: str = "t2v", *, version: str = "1.0", seed: int = 0):
    """An in-memory tiny random CogVideoX pipeline: kind "t2v" (CogVideoXPipeline) or "i2v"
    (CogVideoXImageToVideoPipeline), laid out like CogVideoX `version` "1.0" or "1.5"."""
    import diffusers

    components = tiny_cogvideox_components(kind, version=version, seed=seed)
    return getattr(diffusers, COGVIDEOX_KINDS[kind])(**components)


def build_tiny_cogvideox(folder: str | Path, kind: str = "t2v", *, version: str = "1.0", seed: int = 0) -> Path:
    """Write a tiny random CogVideoX pipeline (kind "t2v" or "i2v", version "1.0" or "1.5") to `folder` and return
    its path. Its profile makes 9-frame videos in 8 steps by default."""
    folder = Path(folder)
    tiny_cogvideox_pipeline(kind, version=version, seed=seed).save_pretrained(folder)
    name = "teaserve/tiny-cogvideox" + ("1.5" if version == "1.5" else "") + ("-i2v" if kind == "i2v" else "")
    write_profile(folder, served_model_name=name, defaults={"num_inference_steps": 8, "num_frames": 9})
    return folder
