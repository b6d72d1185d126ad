"""BAGEL against the official implementation: the same tiny checkpoint, settings and seeds give the same images.

The reference outputs in fixtures/bagel-golden/ (see its README) come from ByteDance-Seed/Bagel's own code in
bfloat16; teaserve runs through `Omni` in bfloat16 too. What is left is bfloat16 rounding (0.3% and 1.1%
relative L2 on the final latents), while single wrong lines of the maths, tried by hand, moved them by 1.3%
(no timestep shift) to 100% (Euler step sign).
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchmetrics.functional.image import peak_signal_noise_ratio

from teaserve import Omni, OmniDiffusionSamplingParams
from teaserve.pipelines.bagel.packing import patchify

FIXTURES = Path(__file__).parent / "fixtures" / "bagel-golden"
CASES = {
    # case: prompt, sampling parameters, edit input (or None), latent tolerance (relative L2)
    "t2i": ("a red cat", {"num_inference_steps": 6, "seed": 3, "width": 48, "height": 32}, None, 0.01),
    "edit": ("make it blue", {"num_inference_steps": 6, "seed": 5}, "input.png", 0.015),
}
MIN_PSNR = 46.0


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """The tiny checkpoint the reference ran on: `build_tiny_bagel`'s default seed, checked byte for byte."""
    from teaserve.pipelines.bagel.testing import build_tiny_bagel

    folder = build_tiny_bagel(tmp_path_factory.mktemp("tiny-bagel-reference"))
    for line in (FIXTURES / "checkpoint.sha256").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, (
            f"build_tiny_bagel now writes a different {name} than the checkpoint the reference outputs were made "
            "on: regenerate fixtures/bagel-golden with the official code, or restore the builder"
        )
    return folder


@pytest.fixture(scope="module")
def omni(reference_checkpoint):
    with Omni(model=str(reference_checkpoint), cache_backend="none", device="cpu", dtype="bfloat16") as omni:
        yield omni


def final_latents_of(omni, request, params):
    """Generate, and read the final packed latents where the autoencoder's decoder receives them."""
    vae = omni.model.pipeline.vae
    received = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: received.append(args[0].float().clone()))
    try:
        output = omni.generate(request, params)[0]
    finally:
        hook.remove()
    (decoder_input,) = received  # decode() undoes the scale and shift before the decoder
    latents = (decoder_input - vae.config.shift_factor) * vae.config.scale_factor
    return output, patchify(latents, omni.model.pipeline.config.latent_patch_size)[0]


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(value - reference) / torch.linalg.vector_norm(reference))


def psnr(image: Image.Image, reference: Image.Image) -> float:
    tensors = [torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32)) for i in (image, reference)]
    return float(peak_signal_noise_ratio(*tensors, data_range=255.0))


@pytest.mark.parametrize("case", list(CASES))
def test_final_latents_and_pixels_match_the_official_implementation(omni, case):
    prompt, params, input_name, tolerance = CASES[case]
    images = {"image": Image.open(FIXTURES / input_name)} if input_name else {}
    output, latents = final_latents_of(
        omni, {"prompt": prompt, "multi_modal_data": images}, OmniDiffusionSamplingParams(**params)
    )
    reference = load_file(str(FIXTURES / "reference_final_latents.safetensors"))[case]
    with Image.open(FIXTURES / f"ref_{case}.png") as expected:
        assert output.images[0].size == expected.size
        assert latents.shape == reference.shape
        distance, quality = relative_l2(latents, reference), psnr(output.images[0], expected)
    assert distance < tolerance, f"{case}: final latents {distance:.2%} away from the reference"
    assert quality > MIN_PSNR, f"{case}: {quality:.1f} dB PSNR against the reference image"
