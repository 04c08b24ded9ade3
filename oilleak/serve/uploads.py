"""An uploaded file's bytes -> an upright RGB uint8 array, or an :class:`UploadError` with the HTTP status
that says what is wrong: 413 too many bytes or pixels, 415 not an image / a format oilleak does not take,
400 a corrupt or truncated image.

Two steps, so the app can count the pixels of every photo of a request against its budget before any is
decoded: :func:`open_upload` reads only the header (a small file that claims a huge size, a decompression
bomb, costs nothing) and :func:`decode_upload` decodes the pixels. Only the bytes sent are read: a client
cannot make the server open a path.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP"}  # what `oilleak predict` reads from folders
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}  # Pillow's modes of 16-bit greyscale PNG and TIFF


class UploadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def open_upload(data: bytes, name: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """The image with its header read and checked, its pixels not decoded yet."""
    if len(data) > max_bytes:
        raise UploadError(413, f"{name}: {len(data) / 2**20:.1f} MiB is over the server's limit of "
                               f"{max_bytes / 2**20:.1f} MiB per image; send a smaller JPEG")
    if not data:
        raise UploadError(400, f"{name}: the file is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow skips EXIF tags that point past the file, and says so
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=None)
        except UnidentifiedImageError:
            raise UploadError(415, f"{name}: not an image oilleak can read; send {', '.join(sorted(FORMATS))}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise UploadError(413, f"{name}: the image is larger than {max_pixels} pixels; resize it first") from None
        except (OSError, ValueError, SyntaxError, struct.error) as exc:
            raise UploadError(400, f"{name}: corrupt image header ({exc})") from None
    if image.format not in FORMATS:
        image.close()
        raise UploadError(415, f"{name}: {image.format} images are not accepted; send {', '.join(sorted(FORMATS))}")
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise UploadError(413, f"{name}: {width}x{height} is {width * height} pixels, over the server's limit of "
                               f"{max_pixels}; resize it or predict it with `oilleak predict --tile`")
    return image


def decode_upload(image: Image.Image, name: str) -> np.ndarray:
    """The pixels of an image from :func:`open_upload`, turned upright by its EXIF orientation, as RGB uint8."""
    with image, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow skips EXIF tags that point past the file, and says so
        try:
            image.load()  # a truncated file fails here (Pillow does not pad truncated images by default)
            upright = ImageOps.exif_transpose(image)
            if upright.mode in SIXTEEN_BIT:  # Pillow's convert("RGB") clips 16-bit values at 255: scale them
                grey = (np.asarray(upright, np.uint32) >> 8).astype(np.uint8)
                return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
            return np.array(upright.convert("RGB"))
        except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError) as exc:
            raise UploadError(400, f"{name}: the image is corrupt or truncated ({exc}); send the whole file") from None


def decode_image(data: bytes, name: str, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Both steps at once."""
    return decode_upload(open_upload(data, name, max_bytes, max_pixels), name)

