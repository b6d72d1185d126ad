"""Qwen-Image Edit and Edit-Plus with diffusers' own condition-image sizing (the other edit tests shrink it).

The pipelines resize every input image to about 1024x1024 (Edit-Plus: and to about 384x384 for the text
encoder) before its latents join the transformer's sequence after the generated image's. One step each, on a
tiny model whose VAE downsamples 8x like Qwen-Image's and has few channels, so that encoding a megapixel stays
cheap on a CPU.
"""

import pytest
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus
from PIL import Image

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.pipelines.testing import save_tiny_qwen, tiny_qwen_pipeline

PORTRAIT = Image.new("RGB", (48, 64), (220, 30, 30))
WIDE = Image.new("RGB", (64, 32), (30, 200, 30))
SIZING = {"edit": pipeline_qwenimage_edit, "edit_plus": pipeline_qwenimage_edit_plus}


@pytest.fixture(scope="module", params=list(SIZING))
def kind_and_omni(request, tmp_path_factory):
    kind = request.param
    pipeline = tiny_qwen_pipeline(kind, vae_base_dim=4, vae_dim_mult=(1, 2, 4, 4))
    folder = save_tiny_qwen(pipeline, tmp_path_factory.mktemp(f"tiny-{kind}-vae8"), kind)
    with Omni(model=str(folder), cache_backend="none") as omni:
        yield kind, omni


def condition_tokens(kind: str, image: Image.Image, tokens_per_pixel: int) -> tuple[int, int, int]:
    """The (frames, rows, columns) of an input image's latent tokens, at the size diffusers computes for it."""
    width, height = SIZING[kind].calculate_dimensions(1024 * 1024, image.width / image.height)[:2]
    assert abs(width * height - 1024 * 1024) < 0.05 * 1024 * 1024  # diffusers' own size, not a test's cap
    return 1, height // tokens_per_pixel, width // tokens_per_pixel


def test_condition_images_reach_the_transformer_at_the_size_diffusers_computes(kind_and_omni):
    kind, omni = kind_and_omni
    images = [PORTRAIT] if kind == "edit" else [PORTRAIT, WIDE]
    pipe = omni.model.pipeline
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((kwargs["hidden_states"].shape[1], kwargs["img_shapes"])),
        with_kwargs=True,
    )
    try:
        output = omni.generate(
            {"prompt": "make it blue", "multi_modal_data": {"image": images}},
            OmniDiffusionSamplingParams(num_inference_steps=1, seed=0, true_cfg_scale=1.0),
        )[0]
    finally:
        hook.remove()
    assert output.images[0].size == PORTRAIT.size  # the output keeps the first image's size
    per_token = pipe.vae_scale_factor * 2
    generated = (1, PORTRAIT.height // per_token, PORTRAIT.width // per_token)
    conditions = [condition_tokens(kind, image, per_token) for image in images]
    shapes = [generated, *conditions]
    assert calls == [(sum(rows * columns for _, rows, columns in shapes), [shapes])]
