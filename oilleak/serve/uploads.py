"""An uploaded file's bytes -> an upright RGB uint8 array, or an :class:`UploadError` with the HTTP status
that says what is wrong: 413 too many bytes or pixels, 415 not an image / a format oilleak does not take,
400 a corrupt or truncated image.

The pixel count is read from the header and checked before any pixel is decoded, so a small file that
claims a huge size (a decompression bomb) costs nothing. Only the bytes sent are read: a client cannot make
the server open a path.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP"}  # what `oilleak predict` reads from folders


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, name: str, max_bytes: int, max_pixels: int) -> np.ndarray:
    if len(data) > max_bytes:
        raise UploadError(413, f"{name}: {len(data) / 2**20:.1f} MiB is over the server's limit of "
                               f"{max_bytes / 2**20:.1f} MiB per image; send a smaller JPEG")
    if not data:
        raise UploadError(400, f"{name}: the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=None)
        except UnidentifiedImageError:
            raise UploadError(415, f"{name}: not an image oilleak can read; send {', '.join(sorted(FORMATS))}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(413, f"{name}: the image is larger than {max_pixels} pixels; resize it first") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise UploadError(400, f"{name}: corrupt image header ({exc})") from None
    with image:
        if image.format not in FORMATS:
            raise UploadError(415, f"{name}: {image.format} images are not accepted; send {', '.join(sorted(FORMATS))}")
        width, height = image.size
        if width * height > max_pixels:
            raise UploadError(413, f"{name}: {width}x{height} is {width * height} pixels, over the server's limit of "
                                   f"{max_pixels}; resize it or predict it with `oilleak predict --tile`")
        try:
            image.load()  # a truncated file fails here (Pillow does not pad truncated images by default)
            return np.array(ImageOps.exif_transpose(image).convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise UploadError(400, f"{name}: the image is corrupt or truncated ({exc}); send the whole file") from None
