"""Safe decoding of user-supplied images."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .params import MAX_PIXELS

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class InvalidImageError(ValueError):
    """An input image that cannot be used; `param` names the input it came from."""

    def __init__(self, message: str, param: str = "image"):
        super().__init__(message)
        self.param = param


def open_image(data: bytes | str | Path | Image.Image, *, param: str = "image") -> Image.Image:
    """Decode `data` (bytes, a file path or a PIL image) into a fully loaded, upright PIL image.

    The format is sniffed from the bytes (never from a name or content type); the pixel count is checked from
    the header, before any pixel is decoded, so a decompression bomb costs nothing.
    """
    if isinstance(data, Image.Image):
        image = data
    else:
        if isinstance(data, str | Path):
            try:
                data = Path(data).read_bytes()
            except OSError as error:
                raise InvalidImageError(f"cannot read image file: {error}", param) from None
        if not data:
            raise InvalidImageError("the image is empty", param)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise InvalidImageError(
                f"not a supported image ({', '.join(ACCEPTED_FORMATS).lower()}): {error}", param
            ) from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise InvalidImageError(f"image of {width}x{height} is over the cap of {MAX_PIXELS} pixels", param)
    if width == 0 or height == 0:
        raise InvalidImageError("the image has no pixels", param)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data
        raise InvalidImageError(f"the image could not be decoded: {error}", param) from None
