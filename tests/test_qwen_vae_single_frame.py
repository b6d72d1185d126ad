"""The Qwen-Image VAE's single-frame 2D convolutions give the stock VAE's latents and images."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import pixels
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from PIL import Image
from torch.overrides import TorchFunctionMode

from teaserve.pipelines import load_model
from teaserve.pipelines.default_model import default_model_path
from teaserve.pipelines.loading import read_architecture
from teaserve.pipelines.qwen_image_vae import SINGLE_FRAME_HOOK, use_single_frame_convs
from teaserve.pipelines.registry import get_family
from teaserve.pipelines.testing import small_edit_condition_images, tiny_qwen_components


class CountConv3d(TorchFunctionMode):
    """Counts the 3D convolutions run inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func is F.conv3d
        return func(*args, **(kwargs or {}))


def embedded_vae():
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage.from_pretrained(str(default_model_path() / "vae"))


VAES = {
    # Three downsamplings, two of them in time: the layout of Qwen-Image's own VAE.
    "tiny-8x": lambda: tiny_qwen_components(vae_dim_mult=(1, 2, 4, 4))["vae"],
    "embedded": embedded_vae,
}


@pytest.fixture(scope="module", params=list(VAES))
def vaes(request):
    """(stock, fast): the same VAE without and with the single-frame convolutions."""
    stock = VAES[request.param]().eval()
    fast = copy.deepcopy(stock)
    use_single_frame_convs(fast)
    return stock, fast


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding: 1e-5 of the values' magnitude."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))


def latents(vae, frames: int, side: int = 8) -> torch.Tensor:
    return torch.randn(2, vae.config.z_dim, frames, side, side, generator=torch.Generator().manual_seed(0))


def images(vae, frames: int, side: int = 32) -> torch.Tensor:
    shape = (2, vae.config.input_channels, frames, side, side)
    return torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1


@torch.no_grad()
def test_single_frame_decode_and_encode_match_the_stock_vae_without_3d_convolutions(vaes):
    stock, fast = vaes
    z, x = latents(stock, 1), images(stock, 1)
    with CountConv3d() as fast_count:
        fast_image, fast_posterior = fast.decode(z).sample, fast.encode(x).latent_dist
    with CountConv3d() as stock_count:
        stock_image, stock_posterior = stock.decode(z).sample, stock.encode(x).latent_dist
    assert_matches(fast_image, stock_image)
    assert_matches(fast_posterior.mean, stock_posterior.mean)
    assert_matches(fast_posterior.logvar, stock_posterior.logvar)
    assert fast_count.count == 0 < stock_count.count


@torch.no_grad()
def test_videos_match_the_stock_vae(vaes):
    """Several frames: the first chunk takes the 2D path, the later ones (with cached frames, and the decoder's
    time upsampling) the stock forward."""
    stock, fast = vaes
    z, x = latents(stock, 2, side=4), images(stock, 5, side=16)
    assert_matches(fast.decode(z).sample, stock.decode(z).sample)
    assert_matches(fast.encode(x).latent_dist.mean, stock.encode(x).latent_dist.mean)


@torch.no_grad()
def test_several_or_cached_frames_run_the_stock_forward_exactly():
    stock = tiny_qwen_components()["vae"].decoder.conv_in
    fast = copy.deepcopy(stock)
    use_single_frame_convs(fast)
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(1, stock.in_channels, 3, 8, 8, generator=generator)
    cached = torch.randn(1, stock.in_channels, 2, 8, 8, generator=generator)
    assert torch.equal(fast(frames), stock(frames))
    assert torch.equal(fast(frames[:, :, :1], cached), stock(frames[:, :, :1], cached))
    assert not torch.equal(fast(frames[:, :, :1], cached), fast(frames[:, :, :1]))  # the cache matters here


@torch.no_grad()
def test_the_2d_path_follows_casts_and_new_weights():
    stock = tiny_qwen_components()["vae"].eval()
    fast = copy.deepcopy(stock)
    use_single_frame_convs(fast)
    z = latents(stock, 1, side=4).double()
    assert_matches(fast.double().decode(z).sample, stock.double().decode(z).sample)
    other = tiny_qwen_components(seed=1)["vae"].double().eval()
    fast.load_state_dict(other.state_dict())
    assert_matches(fast.decode(z).sample, other.decode(z).sample)


def test_hooking_twice_changes_nothing():
    vae = tiny_qwen_components()["vae"]
    use_single_frame_convs(vae)
    use_single_frame_convs(vae)
    registries = [module._diffusers_hook for module in vae.modules() if hasattr(module, "_diffusers_hook")]
    assert registries and all(list(registry.hooks) == [SINGLE_FRAME_HOOK] for registry in registries)


@pytest.mark.parametrize("fixture", ["tiny_qwen", "tiny_edit", "tiny_edit_plus", "tiny_layered"])
def test_every_qwen_image_family_loads_its_vae_with_the_2d_path(request, fixture):
    vae = load_model(request.getfixturevalue(fixture), device="cpu").pipeline.vae
    convs = [module for module in vae.modules() if isinstance(module, QwenImageCausalConv3d)]
    hooked = [module for module in convs if hasattr(module, "_diffusers_hook")]
    # All but the encoder's time-downsampling convolutions, which never see a single frame.
    assert len(hooked) == len(convs) - sum("time_conv" in name for name, _ in vae.encoder.named_modules())
    assert all(module._diffusers_hook.get_hook(SINGLE_FRAME_HOOK) for module in hooked)


def stock_pipeline(folder):
    """The diffusers pipeline of `folder`, loaded without teaserve's family."""
    import diffusers

    family = get_family(read_architecture(folder))
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipeline = pipeline_class.from_pretrained(str(folder), dtype=torch.float32, **family.pretrained_kwargs(folder))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run(pipeline, **kwargs) -> list[Image.Image]:
    kwargs.update(negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=2)
    with torch.no_grad():
        output = pipeline(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pil")
    return [image for group in output.images for image in (group if isinstance(group, list) else [group])]


def test_embedded_model_images_match_the_stock_pipeline():
    kwargs = {"prompt": "a red circle above a blue square", "width": 64, "height": 64}
    with CountConv3d() as count:
        fast = run(load_model(None, device="cpu").pipeline, **kwargs)
    stock = run(stock_pipeline(default_model_path()), **kwargs)
    assert count.count == 0
    assert len(fast) == len(stock) == 1
    difference = np.abs(pixels(fast[0]) - pixels(stock[0]))
    assert difference.max() <= 1 and pixels(stock[0]).std() > 10  # a real image, not a flat one


def test_layered_layers_match_the_stock_pipeline(tiny_layered):
    """Layered encodes its input image and decodes its layers as a batch of single frames."""
    kwargs = {"prompt": "a cat", "image": Image.new("RGBA", (32, 32), (30, 30, 220, 200)), "layers": 2}
    with small_edit_condition_images():
        with CountConv3d() as count:
            fast = run(load_model(tiny_layered, device="cpu").pipeline, **kwargs)
        stock = run(stock_pipeline(tiny_layered), **kwargs)
    assert count.count == 0 and len(fast) == len(stock) == 2
    for fast_layer, stock_layer in zip(fast, stock, strict=True):
        assert fast_layer.mode == "RGBA" and np.abs(pixels(fast_layer) - pixels(stock_layer)).max() <= 1
