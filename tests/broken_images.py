"""A corpus of broken and odd image files, made by code (nothing downloaded), for every way oilleak reads
a photo: `oilleak serve`'s /predict, `oilleak predict`, `oilleak convert` and the Python API.

Each :class:`Sample` says what a reader must do with it:
- ``"refuse"``: the file is broken (truncated, wrong magic, not an image, a header claiming 65535 x 65535
  pixels, an EXIF block that lies about its sizes); the reader answers a clear error naming the file;
- ``"read"``: an odd but valid image (1 x 1, CMYK, 16-bit, a first GIF frame, a huge EXIF comment): the reader
  either reads it, as ``expect_size`` (width, height), or refuses it clearly; never a traceback.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    kind: str  # "refuse" or "read"
    why: str
    expect_size: tuple[int, int] | None = None  # (width, height) when it is read


def _noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height (decoding it would need width * height * 3 bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to claim width x height."""
    data = bytearray(_saved(Image.fromarray(_noise(64, 48)), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _exif_lying_about_sizes() -> bytes:
    """A TIFF-structured EXIF block whose IFD says an entry holds 2^28 values far past its end and whose
    next-IFD pointer loops back to itself (the shapes of EXIF bombs)."""
    entries = [(0x010E, 2, 0x0FFFFFFF, 0x7FFFFFF0),  # ImageDescription: 256 M characters at a far offset
               (0x0112, 3, 1, 6 << 16)]  # Orientation 6 (rotate 90), stored inline
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHII", *e) for e in entries) + struct.pack(">I", 8)
    return b"Exif\0\0" + b"MM\0\x2a" + struct.pack(">I", 8) + ifd


def _jpeg_with_exif(exif: bytes, size: tuple[int, int] = (64, 48)) -> bytes:
    """A JPEG with ``exif`` (starting with b"Exif\\0\\0") as its APP1 segment, put in by hand."""
    plain = _saved(Image.fromarray(_noise(*size, seed=3)), "JPEG", quality=80)
    body = exif if exif.startswith(b"Exif") else b"Exif\0\0" + exif
    segment = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    return plain[:2] + segment + plain[2:]


def corpus() -> list[Sample]:
    photo = _saved(Image.fromarray(_noise(200, 150, seed=1)), "JPEG", quality=90)
    png = _saved(Image.fromarray(_noise(120, 90, seed=2)), "PNG")
    frames = [Image.fromarray(np.full((40, 60, 3), v, np.uint8)) for v in (0, 128, 255)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    description = Image.Exif()
    description[0x010E] = "x" * 60_000  # a 60 kB ImageDescription: near the 64 kB a JPEG segment holds
    huge_exif = _saved(Image.fromarray(_noise(64, 48, seed=4)), "JPEG", quality=80, exif=description.tobytes())
    gray16 = np.linspace(0, 65535, 50 * 40).reshape(40, 50).astype(np.uint16)
    rgb16 = np.dstack([gray16, gray16[::-1], 65535 - gray16])
    return [
        Sample("truncated.jpg", photo[: len(photo) // 2], "refuse", "a JPEG cut in half"),
        Sample("truncated.png", png[: len(png) // 2], "refuse", "a PNG cut in half"),
        Sample("header_only.jpg", photo[:200], "refuse", "the first 200 bytes of a JPEG"),
        Sample("wrong_magic.jpg", b"\0\0\0\0" + photo[4:], "refuse", "a JPEG whose first 4 bytes are zeroed"),
        Sample("wrong_magic.png", b"\x89PNX" + png[4:], "refuse", "a PNG whose signature is wrong"),
        Sample("text.jpg", b"this is not an image\n" * 10, "refuse", "text named .jpg"),
        Sample("empty.png", b"", "refuse", "0 bytes"),
        Sample("huge_header.png", png_claiming(65535, 65535), "refuse", "a PNG header claiming 65535 x 65535"),
        Sample("huge_header.jpg", jpeg_claiming(65535, 65535), "refuse", "a JPEG frame header claiming 65535 x 65535"),
        Sample("exif_bomb.jpg", _jpeg_with_exif(_exif_lying_about_sizes()), "read",
               "EXIF with an entry of 2^28 values past its end and an IFD loop (its orientation may be applied or not)"),
        Sample("one_pixel.png", _saved(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "read", "1 x 1", (1, 1)),
        Sample("one_pixel.jpg", _saved(Image.new("RGB", (1, 1), (200, 30, 30)), "JPEG"), "read", "1 x 1 JPEG", (1, 1)),
        Sample("cmyk.jpg", _saved(Image.new("CMYK", (80, 60), (0, 200, 200, 0)), "JPEG"), "read", "a CMYK JPEG", (80, 60)),
        Sample("gray16.png", cv2.imencode(".png", gray16)[1].tobytes(), "read", "a 16-bit greyscale PNG", (50, 40)),
        Sample("rgb16.png", cv2.imencode(".png", rgb16)[1].tobytes(), "read", "a 16-bit RGB PNG", (50, 40)),
        Sample("animated.gif", gif.getvalue(), "read", "an animated GIF of 3 frames (the first is read)", (60, 40)),
        Sample("huge_exif.jpg", huge_exif, "read", "a 60 kB EXIF ImageDescription", (64, 48)),
    ]


def write_corpus(folder: Path) -> list[Sample]:
    """Every sample as a file in ``folder`` (made if needed); the samples, in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = corpus()
    for sample in samples:
        (folder / sample.name).write_bytes(sample.data)
    return samples
