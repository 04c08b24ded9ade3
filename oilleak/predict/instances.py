"""Predicted instances as prediction files use them: a mask cropped to its extent, polygons, areas.

A mask is kept as a crop at its offset in the image instead of a full-size array, so a very large
(tiled) image with many instances stays small in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from oilleak.structures import CroppedDetections


@dataclass
class Instance:
    label: int
    score: float
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    mask: np.ndarray  # (h, w) bool: the mask's extent
    origin: tuple[int, int]  # (x, y) of mask[0, 0] in the image

    @property
    def area(self) -> int:
        return int(self.mask.sum())

    def shifted(self, dx: int, dy: int) -> Instance:
        x1, y1, x2, y2 = self.box
        return Instance(self.label, self.score, (x1 + dx, y1 + dy, x2 + dx, y2 + dy), self.mask, (self.origin[0] + dx, self.origin[1] + dy))

    def full_mask(self, height: int, width: int) -> np.ndarray:
        out = np.zeros((height, width), bool)
        x, y = self.origin
        h, w = self.mask.shape
        out[y : y + h, x : x + w] = self.mask
        return out


def crop_mask(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int]] | None:
    """The smallest crop holding every pixel of ``mask`` and its (x, y) offset; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return np.ascontiguousarray(mask[y0:y1, x0:x1]), (int(x0), int(y0))


def instances_from_detections(dets: CroppedDetections, score_thr: float) -> list[Instance]:
    """Detections at or above ``score_thr`` whose mask has a pixel (an empty mask has no outline to show)."""
    out = []
    for i in np.flatnonzero(dets.scores.cpu().numpy() >= score_thr):
        cropped = crop_mask(dets.crops[i].cpu().numpy())
        if cropped is None:
            continue
        mask, (x, y) = cropped
        box = tuple(float(v) for v in dets.boxes[i])
        out.append(Instance(int(dets.labels[i]), float(dets.scores[i]), box, mask, (x + dets.origins[i][0], y + dets.origins[i][1])))
    return out


def fill_holes(instance: Instance) -> Instance:
    """The instance with the holes of its mask filled: its area is what its outline encloses.

    Prediction files describe an instance by its outline, and neither labelme nor COCO polygons can
    describe a hole (several polygons of one instance are joined, never subtracted); filling keeps the
    mask, the areas and the polygons in agreement, so a labelme correction round trip gives back the mask.
    """
    contours, _ = cv2.findContours(instance.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(instance.mask.shape, np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return replace(instance, mask=filled.astype(bool))


def mask_polygons(instance: Instance) -> list[list[tuple[float, float]]]:
    """Outer outlines of the mask (holes are not kept: see `fill_holes`), in image pixels where pixel (i, j) covers
    [i, i + 1] x [j, j + 1]: the convention pycocotools rasterises polygons with, so the polygons give
    back the mask (labelme -> `oilleak convert` -> COCO round trip).

    The mask is traced at twice its resolution: there the outline runs a quarter pixel inside the
    pixel edges and still encloses every pixel centre, which tracing at full resolution (through the
    centres of the border pixels) would cut in half. Points on straight runs are then dropped with a
    tolerance of a quarter pixel, which leaves the rasterised mask unchanged.
    """
    up = np.kron(instance.mask.astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    x0, y0 = instance.origin
    polygons = []
    for contour in contours:
        simplified = cv2.approxPolyDP(contour, 0.5, True)  # 0.5 at twice the resolution = 0.25 px
        if len(simplified) >= 3:
            contour = simplified
        points = (contour.reshape(-1, 2).astype(np.float64) + 0.5) / 2
        polygons.append([(round(x + x0, 2), round(y + y0, 2)) for x, y in points])
    return polygons
