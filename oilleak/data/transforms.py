"""Image and ground-truth transforms: resize, flip, normalise, pad, and the inverse mapping of predictions.

The pixels are mmdetection's, so an mmdetection checkpoint sees in oilleak what it saw in mmdetection:
- decode with OpenCV (``cv2.imdecode``, IMREAD_COLOR: 3 channels, turned upright by the EXIF orientation), as
  mmcv's ``LoadImageFromFile``; PIL's JPEG decoder can differ by a grey level here and there;
- resize keeps the aspect ratio to fit ``scale = (long, short)``: ``s = min(long / long_edge, short / short_edge)``,
  new size ``(int(w * s + 0.5), int(h * s + 0.5))`` and ``scale_factor = (new_w / w, new_h / h)``, as mmcv's
  ``imrescale``; the image with OpenCV's bilinear (``INTER_LINEAR``, no antialiasing when shrinking, unlike PIL's),
  masks and semantic maps by nearest neighbour (source pixel ``floor(dst * src / dst_size)``, as cv2's nearest);
- horizontal flip: ``x1' = W - x2``, ``x2' = W - x1``;
- photometric distortion (training, ``data.photometric``): mmdetection's ``PhotoMetricDistortion`` on the
  resized image, see :class:`PhotometricDistortion`;
- normalise: RGB, ``(x - MEAN) / STD``; padding to a multiple of 32 happens in :func:`pad_batch`, after
  normalisation, so padded image pixels are exactly 0 and padded semantic pixels are ``SEM_IGNORE``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from oilleak.data.rescale import rescale_size  # here too: its callers import it from the transforms
from oilleak.errors import OilleakError
from oilleak.structures import SEM_IGNORE, ImageMeta, Targets

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SIZE_DIVISOR = 32
EXIF_ORIENTATION = 0x0112  # the EXIF tag
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # orientations that turn the image by 90 degrees: width and height swap


def _refuse_huge_header(data: np.ndarray, path: str | Path) -> None:
    """An OilleakError when the file's header claims more pixels than Pillow opens (2 x its MAX_IMAGE_PIXELS,
    179 MP): Pillow reads only the header to tell. OpenCV would pad a 1 kB JPEG claiming 30000 x 30000 into
    2.7 GB of grey, and raises instead of returning None above 2^30 pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning and EXIF complaints: not errors here
            Image.open(io.BytesIO(data.tobytes())).close()
    except Image.DecompressionBombError as exc:
        raise OilleakError(f"cannot read image {path}: {exc}; replace it with a readable, smaller JPEG/PNG "
                           "or remove it") from None
    except Exception:  # noqa: BLE001 (a header Pillow cannot read is left to OpenCV to judge)
        return


def load_image(path: str | Path) -> np.ndarray:
    """The image as stored, turned upright by its EXIF orientation: (H, W, 3) RGB uint8, decoded as mmcv does;
    a header claiming a huge size is refused before decoding."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        raise OilleakError(f"cannot read image {path}: {exc.strerror or exc}; check the path and its permissions") from None
    if data.size:
        _refuse_huge_header(data, path)
    try:
        image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    except cv2.error:  # OpenCV's own size limit, or a decoder assertion: the file is unusable either way
        image = None
    if image is None:  # OpenCV gives None for truncated, damaged or unknown files
        raise OilleakError(
            f"cannot read image {path}: OpenCV cannot decode it (truncated, damaged or not an image); "
            "replace the file with a readable JPEG/PNG or remove it from the dataset"
        )
    return np.ascontiguousarray(image[..., ::-1])  # BGR -> RGB


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 image to ``size = (w, h)``: OpenCV's, as mmcv's ``imresize``."""
    if (image.shape[1], image.shape[0]) == tuple(size):
        return image
    return cv2.resize(image, tuple(size), interpolation=cv2.INTER_LINEAR)


def resize_nearest(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of (..., H, W) bool/uint8 maps to ``size = (w, h)``, dtype kept."""
    lead = maps.shape[:-2]
    if (maps.shape[-1], maps.shape[-2]) == tuple(size):
        return maps
    if maps.numel() == 0:  # no instances: interpolate refuses empty inputs
        return maps.new_zeros(*lead, size[1], size[0])
    flat = maps.reshape(1, -1, *maps.shape[-2:])
    if maps.dtype == torch.bool:  # interpolate takes no bool; the same bytes as uint8, without a copy
        flat = flat.view(torch.uint8)
    out = F.interpolate(flat, size=(size[1], size[0]), mode="nearest").reshape(*lead, size[1], size[0])
    return out.view(torch.bool) if maps.dtype == torch.bool else out


def normalize(image: np.ndarray) -> Tensor:
    """(H, W, 3) RGB uint8 -> (3, H, W) float32, ``(x - MEAN) / STD``."""
    # in numpy, channels last: about 3x faster than the same float32 arithmetic on a permuted tensor
    x = image.astype(np.float32)
    x -= np.array(MEAN, np.float32)
    x /= np.array(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def padded_size(height: int, width: int) -> tuple[int, int]:
    return -(-height // SIZE_DIVISOR) * SIZE_DIVISOR, -(-width // SIZE_DIVISOR) * SIZE_DIVISOR


def _resize(image: np.ndarray, scale: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    height, width = image.shape[:2]
    new_w, new_h = rescale_size(width, height, scale)
    return resize_image(image, (new_w, new_h)), (new_w / width, new_h / height)


def _meta(image_id: int, file_name: str, ori_hw: tuple[int, int], img_hw: tuple[int, int],
          scale_factor: tuple[float, float], flip: bool) -> ImageMeta:
    return ImageMeta(image_id=image_id, file_name=file_name, ori_shape=ori_hw, img_shape=img_hw,
                     pad_shape=padded_size(*img_hw), scale_factor=scale_factor, flip=flip)


def prepare_image(image: np.ndarray, scale: tuple[int, int], image_id: int = 0,
                  file_name: str = "") -> tuple[Tensor, ImageMeta]:
    """The test transform for a raw (H, W, 3) RGB uint8 image: resize to fit ``scale`` and normalise.

    Returns the unpadded (3, h, w) tensor and its meta; :func:`pad_batch` pads it for the model.
    """
    resized, scale_factor = _resize(image, scale)
    meta = _meta(image_id, file_name, image.shape[:2], resized.shape[:2], scale_factor, flip=False)
    return normalize(resized), meta


def resize_boxes(boxes: Tensor, scale_factor: tuple[float, float], img_hw: tuple[int, int]) -> Tensor:
    """Scale (K, 4) boxes by ``scale_factor = (w, h)`` and clip them to the resized image."""
    sx, sy = scale_factor
    out = boxes * boxes.new_tensor([sx, sy, sx, sy])
    out[:, 0::2] = out[:, 0::2].clamp(0, img_hw[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, img_hw[0])
    return out


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


@dataclass(frozen=True)
class PhotometricDistortion:
    """One draw of mmdetection's ``PhotoMetricDistortion``: brightness, contrast, saturation and hue changes,
    each present (not None) with probability 0.5, contrast before or after the HSV part at random.

    mmdetection works on an unclipped float image; here every step clips to 0..255 so that the HSV part and
    the result stay an image (uint8 out). mmdetection's random channel swap is left out: the colour of a
    stain is part of what is learnt.
    """

    brightness: float | None  # added to every channel, uniform in -32..32
    contrast: float | None  # every channel multiplied, uniform in 0.5..1.5
    saturation: float | None  # HSV saturation multiplied, uniform in 0.5..1.5
    hue: float | None  # degrees added to the HSV hue, uniform in -18..18
    contrast_first: bool

    @classmethod
    def draw(cls, rng: np.random.Generator) -> PhotometricDistortion:
        contrast_first, *present = rng.integers(2, size=5).astype(bool)
        values = (rng.uniform(-32, 32), rng.uniform(0.5, 1.5), rng.uniform(0.5, 1.5), rng.uniform(-18, 18))
        return cls(*(float(v) if p else None for p, v in zip(present, values)), contrast_first=bool(contrast_first))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) RGB uint8 -> the distorted (H, W, 3) RGB uint8."""
        x = image.astype(np.float32)
        if self.brightness is not None:
            x = np.clip(x + self.brightness, 0, 255)
        if self.contrast is not None and self.contrast_first:
            x = np.clip(x * self.contrast, 0, 255)
        if self.saturation is not None or self.hue is not None:
            hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # float32: hue in degrees 0..360, saturation 0..1
            if self.saturation is not None:
                hsv[..., 1] = np.clip(hsv[..., 1] * self.saturation, 0, 1)
            if self.hue is not None:
                hsv[..., 0] = np.mod(hsv[..., 0] + self.hue, 360)
            x = np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), 0, 255)
        if self.contrast is not None and not self.contrast_first:
            x = np.clip(x * self.contrast, 0, 255)
        return np.rint(x).astype(np.uint8)


def transform_train(image: np.ndarray, targets: Targets, scale: tuple[int, int], flip: bool,
                    image_id: int = 0, file_name: str = "",
                    photometric: PhotometricDistortion | None = None) -> tuple[Tensor, ImageMeta, Targets]:
    """The training transform: resize to fit ``scale``, optionally flip and distort the colours, normalise.

    ``targets`` are in original image pixels (masks (K, H, W) bool, sem_seg (H, W) uint8); the returned
    targets are in the pixels of the returned (3, h, w) tensor.
    """
    resized, scale_factor = _resize(image, scale)
    img_h, img_w = resized.shape[:2]
    boxes = resize_boxes(targets.boxes, scale_factor, (img_h, img_w))
    masks = resize_nearest(targets.masks, (img_w, img_h))
    sem_seg = resize_nearest(targets.sem_seg, (img_w, img_h))
    if flip:
        resized = resized[:, ::-1]
        boxes = flip_boxes(boxes, img_w)
        masks = masks.flip(-1)
        sem_seg = sem_seg.flip(-1)
    if photometric is not None:
        resized = photometric(resized)
    meta = _meta(image_id, file_name, image.shape[:2], (img_h, img_w), scale_factor, flip)
    return normalize(resized), meta, Targets(boxes, targets.labels, masks, sem_seg)


def pad_batch(images: list[Tensor], sem_segs: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor] | None]:
    """Stack (3, h, w) images zero-padded bottom/right to the largest size rounded up to 32; semantic maps
    are padded to the same size with ``SEM_IGNORE``."""
    height, width = padded_size(max(im.shape[1] for im in images), max(im.shape[2] for im in images))
    batch = images[0].new_zeros(len(images), 3, height, width)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[1], : im.shape[2]] = im
    if sem_segs is None:
        return batch, None
    padded = []
    for sem in sem_segs:
        out = sem.new_full((height, width), SEM_IGNORE)
        out[: sem.shape[0], : sem.shape[1]] = sem
        padded.append(out)
    return batch, padded


def boxes_to_original(boxes: Tensor, meta: ImageMeta) -> Tensor:
    """Map (n, 4) boxes from input-tensor pixels back to the original image: undo the flip, divide by
    ``scale_factor`` and clip to ``ori_shape``."""
    out = flip_boxes(boxes, meta.img_shape[1]) if meta.flip else boxes.clone()
    sx, sy = meta.scale_factor
    out = out / out.new_tensor([sx, sy, sx, sy])
    out[:, 0::2] = out[:, 0::2].clamp(0, meta.ori_shape[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, meta.ori_shape[0])
    return out
