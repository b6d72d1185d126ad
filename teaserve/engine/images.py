"""Safe decoding of user-supplied images: headers first, pixels only once every header is within the limits."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from .args import EngineArgs
from .errors import InvalidImageError
from .limits import check_input_limits

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")

ImageSource = bytes | str | Path | BinaryIO | Image.Image
"""An input image as a user gives it: encoded bytes, a file path, an open binary file, or a PIL image."""


def open_header(data: ImageSource, param: str = "image") -> Image.Image:
    """A lazily opened image: its header is read (size, format), none of its pixels are decoded.

    The format is sniffed from the bytes (never from a name or content type).
    """
    if isinstance(data, Image.Image):
        return data
    if isinstance(data, str | Path):
        try:
            data = Path(data).read_bytes()
        except OSError as error:
            raise InvalidImageError(f"cannot read image file: {error}", param) from None
    if not isinstance(data, bytes) and not hasattr(data, "read"):
        raise InvalidImageError(
            f"an image must be encoded bytes, a file path, a binary file or a PIL image, got {type(data).__name__}",
            param,
        )
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    if stream.seek(0, io.SEEK_END) == 0:
        raise InvalidImageError("the image is empty", param)
    stream.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream, formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidImageError(
            f"not a supported image ({', '.join(ACCEPTED_FORMATS).lower()}): {error}", param
        ) from None
    if image.width == 0 or image.height == 0:
        raise InvalidImageError("the image has no pixels", param)
    return image


def decode_image(image: Image.Image, param: str = "image") -> Image.Image:
    """Decode the pixels of an image opened by `open_header`, upright (EXIF orientation applied); an image whose
    pixels are already decoded is returned as it is."""
    if not (isinstance(image, ImageFile.ImageFile) and image.tile):
        return image
    try:
        image.load()
        if image.getexif().get(ExifTags.Base.Orientation, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data
        raise InvalidImageError(f"the image could not be decoded: {error}", param) from None


def open_inputs(
    images: list[ImageSource], mask: ImageSource | None, args: EngineArgs
) -> tuple[list[Image.Image], Image.Image | None]:
    """Decode a request's input images and mask, refusing from the headers alone what is over `args`' limits.

    Blocking (it decodes pixels): call it off the event loop.
    """
    headers = [open_header(image, "image") for image in images]
    mask_header = None if mask is None else open_header(mask, "mask")
    sizes = [("image", header.size) for header in headers]
    if mask_header is not None:
        sizes.append(("mask", mask_header.size))
    check_input_limits(args, sizes)
    decoded = [decode_image(header, "image") for header in headers]
    decoded_mask = None if mask_header is None else decode_image(mask_header, "mask")
    if decoded_mask is not None and decoded and decoded_mask.size != decoded[0].size:
        raise InvalidImageError(
            f"the mask ({decoded_mask.width}x{decoded_mask.height}) must have the size of the first image "
            f"({decoded[0].width}x{decoded[0].height})",
            "mask",
        )
    return decoded, decoded_mask
