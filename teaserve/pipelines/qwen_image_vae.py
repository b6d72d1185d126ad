"""The Qwen-Image VAE's causal 3D convolutions run as the 2D convolutions they equal on a single frame.

The VAE (AutoencoderKLQwenImage, shared with Wan's video VAE) pads time causally: a QwenImageCausalConv3d puts
`2 * padding` zero frames in front of its input and none behind. Qwen-Image's images are one frame, and the VAE
encodes and decodes them frame by frame with an empty feature cache (it passes no `cache_x`; its time-resampling
layers skip their time convolution on the first chunk). A one-frame input padded that way spans the kernel's time
extent exactly once: every time tap but the last meets only zeros, so the output is the 2D convolution of the frame
with the last time slice of the weight, with the same bias, spatial padding, stride, dilation and groups.

CPU and GPU libraries run 2D convolutions far faster than 3D ones, and the zero taps cost nothing any more. Any
other call (several frames, cached frames, a kernel whose time extent differs from its padding) runs the stock
forward, so a video model sharing the class is unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

SINGLE_FRAME_HOOK = "qwen_image_vae_single_frame"


def single_frame_is_2d(conv: QwenImageCausalConv3d) -> bool:
    """True when one frame, padded causally, makes exactly one output frame, through the last time tap."""
    return conv.dilation[0] * (conv.kernel_size[0] - 1) == conv._padding[4]


class SingleFrameConvHook(ModelHook):
    """Computes a QwenImageCausalConv3d on one uncached frame as a 2D convolution; anything else runs the stock
    forward."""

    def new_forward(self, module: QwenImageCausalConv3d, x: torch.Tensor, cache_x: torch.Tensor | None = None):
        if x.dim() != 5 or x.shape[2] != 1 or cache_x is not None:
            return self.fn_ref.original_forward(x, cache_x)
        width_padding, _, height_padding, _, _, _ = module._padding
        # A view of the weight, taken per call: it follows every .to() and weight load, holds no copy, and
        # costs nothing measurable next to the convolution.
        output = F.conv2d(
            x[:, :, 0],
            module.weight[:, :, -1],
            module.bias,
            stride=module.stride[1:],
            padding=(height_padding, width_padding),
            dilation=module.dilation[1:],
            groups=module.groups,
        )
        return output.unsqueeze(2)


def use_single_frame_convs(vae: torch.nn.Module) -> None:
    """Hook every causal convolution of `vae` whose single-frame output is a 2D convolution (calling it again
    changes nothing)."""
    for module in vae.modules():
        if isinstance(module, QwenImageCausalConv3d) and single_frame_is_2d(module):
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if registry.get_hook(SINGLE_FRAME_HOOK) is None:
                registry.register_hook(SingleFrameConvHook(), SINGLE_FRAME_HOOK)
