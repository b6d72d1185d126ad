"""The engine's limits on one request (`EngineArgs`) and the seed rule, checked before a request is queued or its
inputs decoded.

Each refusal names the parameter that went over, the limit, and the setting (field and flag) that raises it.
"""

from __future__ import annotations

from .args import EngineArgs, setting_name
from .errors import InvalidImageError, InvalidParameterError
from .params import MAX_SEED


def _over(what: str, limit: int | float, setting: str) -> str:
    shown = f"{limit:g}" if isinstance(limit, float) else str(limit)
    return f"{what}, over the limit of {shown}; {setting_name(setting)} raises it"


def check_work_limits(args: EngineArgs, *, steps: int, outputs: int) -> None:
    """Refuse a request that asks for more denoising steps or more images than `args` allow."""
    if steps > args.max_steps:
        message = _over(f"{steps} denoising steps", args.max_steps, "max_steps")
        raise InvalidParameterError(message, "num_inference_steps")
    if outputs > args.max_outputs:
        raise InvalidParameterError(_over(f"{outputs} images per request", args.max_outputs, "max_outputs"), "n")


def check_size_limits(args: EngineArgs, *, width: int, height: int, outputs: int, images_per_output: int) -> None:
    """Refuse an output size, or a request's output pixels, over the limits of `args`."""
    if width * height > args.max_image_pixels:
        raise InvalidParameterError(
            _over(f"size {width}x{height} has {width * height} pixels", args.max_image_pixels, "max_image_pixels"),
            "size",
        )
    ratio = max(width, height) / min(width, height)
    if ratio > args.max_aspect_ratio:
        shape = f"size {width}x{height} has an aspect ratio of {ratio:.4g}"
        raise InvalidParameterError(_over(shape, args.max_aspect_ratio, "max_aspect_ratio"), "size")
    total = outputs * images_per_output * width * height
    if total > args.max_request_pixels:
        made = f"{outputs} x {images_per_output} image(s)" if images_per_output > 1 else f"{outputs} images"
        raise InvalidParameterError(
            _over(f"{made} of {width}x{height} make {total} pixels", args.max_request_pixels, "max_request_pixels"),
            "n",
        )


def check_seed(seed: int | None, outputs: int) -> None:
    """Image i of a request uses seed + i: every one of them must be a valid seed."""
    if seed is not None and seed + outputs - 1 > MAX_SEED:
        raise InvalidParameterError(
            f"seed {seed} leaves no room for {outputs} consecutive seeds (image i uses seed + i); "
            f"the largest seed for {outputs} images is {MAX_SEED - outputs + 1}",
            "seed",
        )


def check_input_limits(args: EngineArgs, sizes: list[tuple[str, tuple[int, int]]]) -> None:
    """Refuse input images (`(param, (width, height))`, from their headers) over the pixel limits of `args`."""
    for param, (width, height) in sizes:
        if width * height > args.max_input_image_pixels:
            raise InvalidImageError(
                _over(
                    f"the {param} of {width}x{height} has {width * height} pixels",
                    args.max_input_image_pixels,
                    "max_input_image_pixels",
                ),
                param,
            )
    total = sum(width * height for _, (width, height) in sizes)
    if total > args.max_input_pixels:
        raise InvalidImageError(
            _over(f"the input images have {total} pixels in all", args.max_input_pixels, "max_input_pixels"), "image"
        )
