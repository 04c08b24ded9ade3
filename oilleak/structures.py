"""The few data structures that cross layers (data -> model -> train / evaluate / predict).

Conventions everywhere in oilleak:
- boxes are ``x1, y1, x2, y2`` float pixels of the tensor they refer to (no +1);
- labels are 0-based class indices (``0 .. num_classes - 1``); the config's class list names them;
- semantic maps: 0 = background, class k -> k + 1, 255 = ignore (also the padding value).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

SEM_IGNORE = 255


@dataclass
class ImageMeta:
    """Where an input tensor came from, so predictions can be mapped back to the original image."""

    image_id: int
    file_name: str
    ori_shape: tuple[int, int]  # (H, W) of the image as stored (after EXIF orientation)
    img_shape: tuple[int, int]  # (H, W) after resize, before padding
    pad_shape: tuple[int, int]  # (H, W) of this image padded to a multiple of 32
    scale_factor: tuple[float, float]  # (w, h): resized / original
    flip: bool = False


@dataclass
class Targets:
    """Ground truth of one image in the coordinates of the (resized, possibly flipped) input tensor."""

    boxes: Tensor  # (K, 4) float32
    labels: Tensor  # (K,) int64
    masks: Tensor  # (K, h, w) bool, h, w = img_shape (unpadded)
    sem_seg: Tensor  # (H, W) uint8, padded with SEM_IGNORE to the batch's padded size by collate

    def to(self, device: torch.device | str) -> Targets:
        return Targets(*(t.to(device, non_blocking=True) for t in (self.boxes, self.labels, self.masks, self.sem_seg)))

    def pin_memory(self) -> Targets:
        return Targets(*(t.pin_memory() for t in (self.boxes, self.labels, self.masks, self.sem_seg)))


@dataclass
class Batch:
    """What the data loader yields and the model consumes."""

    images: Tensor  # (N, 3, H, W) float32, RGB normalised, zero-padded bottom/right to a multiple of 32
    metas: list[ImageMeta]
    targets: list[Targets] | None = None  # training / evaluation only

    def to(self, device: torch.device | str) -> Batch:
        targets = None if self.targets is None else [t.to(device) for t in self.targets]
        return replace(self, images=self.images.to(device, non_blocking=True), targets=targets)

    def pin_memory(self) -> Batch:
        """Page-locked copies, so that ``to(cuda)`` is an asynchronous copy. ``DataLoader(pin_memory=True)``
        calls this in its pinning thread; without it the loader passes a dataclass through unpinned."""
        targets = None if self.targets is None else [t.pin_memory() for t in self.targets]
        return replace(self, images=self.images.pin_memory(), targets=targets)

    def __len__(self) -> int:
        return len(self.metas)


@dataclass
class Detections:
    """Predictions for one image, in ORIGINAL image pixels (``ImageMeta.ori_shape``)."""

    boxes: Tensor  # (n, 4) float32
    scores: Tensor  # (n,) float32, descending
    labels: Tensor  # (n,) int64, 0-based
    masks: Tensor  # (n, H_ori, W_ori) bool

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to(self, device: torch.device | str) -> Detections:
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device), self.masks.to(device))


@dataclass
class CroppedDetections:
    """:class:`Detections` whose masks are kept as windows around their boxes (prediction on large photos,
    where n full-size masks would take n * H * W bytes): mask i is ``crops[i]`` at ``origins[i]`` = (x, y)."""

    boxes: Tensor  # (n, 4) float32
    scores: Tensor  # (n,) float32, descending
    labels: Tensor  # (n,) int64, 0-based
    crops: list[Tensor]  # (h_i, w_i) bool each
    origins: list[tuple[int, int]]

    def __len__(self) -> int:
        return int(self.scores.numel())
