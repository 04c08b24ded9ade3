"""What runs around the ONNX graph, numpy and OpenCV only (no PyTorch): the image's resize before it, and after it
the boxes back to the original image and each 28x28 mask probability pasted at its box.

The paste is ``oilleak.models.mask_head.paste_masks`` (mmdet's CPU ``_do_paste_mask``) written as two small
interpolation matrices: bilinear sampling at the pixel centres of a window reaching 1 px beyond the box,
``align_corners=False``, zeros outside the 28x28 grid, thresholded with ``>=``.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from oilleak.data.rescale import rescale_size  # not data.transforms, which imports PyTorch


def resize_for_graph(image: np.ndarray, scale: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """(H, W, 3) RGB uint8 -> the graph's input and its (w, h) scale factor; resized as the PyTorch path and
    mmdetection resize (OpenCV's bilinear, no antialiasing), so the graph sees the pixels a checkpoint saw."""
    height, width = image.shape[:2]
    new_w, new_h = rescale_size(width, height, scale)
    if (new_w, new_h) != (width, height):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(image), (new_w / width, new_h / height)


def boxes_to_original(boxes: np.ndarray, scale_factor: tuple[float, float]) -> np.ndarray:
    """(n, 4) float32 boxes in graph-input pixels -> original pixels (divided by the scale, as PyTorch does)."""
    sx, sy = scale_factor
    return boxes / np.array([sx, sy, sx, sy], np.float32)


def _sampling_matrix(centres: np.ndarray, low: np.float32, high: np.float32, size: int) -> np.ndarray:
    """(len(centres), size) bilinear weights that sample a ``size``-long grid spanning [low, high]."""
    with np.errstate(divide="ignore", invalid="ignore"):  # a zero-width box: handled below, as PyTorch does
        normalised = (centres - low) / (high - low) * np.float32(2) - np.float32(1)
    normalised = np.where(np.isinf(normalised), np.float32(0), normalised)
    source = ((normalised + 1) * size - 1) / 2  # grid_sample's unnormalisation, align_corners=False
    first = np.floor(source)
    upper_weight = source - first
    weights = np.zeros((len(centres), size), np.float32)
    rows = np.arange(len(centres))
    for index, weight in ((first, 1 - upper_weight), (first + 1, upper_weight)):
        inside = (index >= 0) & (index <= size - 1)
        weights[rows[inside], index[inside].astype(np.int64)] += weight[inside]
    return weights


def paste_mask(probs: np.ndarray, box: np.ndarray, image_hw: tuple[int, int], threshold: float) -> tuple[np.ndarray, tuple[int, int]]:
    """One (S, S) mask probability pasted at ``box`` (original pixels) -> (window mask bool, (x, y) of its
    top-left pixel). Pixels outside the window are False; the window may be empty (0 x 0)."""
    height, width = image_hw
    x0, y0, x1, y1 = (np.float32(v) for v in box)
    left, top = max(math.floor(x0) - 1, 0), max(math.floor(y0) - 1, 0)
    right, bottom = min(math.ceil(x1) + 1, width), min(math.ceil(y1) + 1, height)
    if right <= left or bottom <= top:
        return np.zeros((0, 0), bool), (left, top)
    xs = np.arange(left, right, dtype=np.float32) + np.float32(0.5)
    ys = np.arange(top, bottom, dtype=np.float32) + np.float32(0.5)
    size = probs.shape[-1]
    sampled = _sampling_matrix(ys, y0, y1, size) @ probs.astype(np.float32) @ _sampling_matrix(xs, x0, x1, size).T
    return sampled >= threshold, (left, top)


def full_mask(window: np.ndarray, origin: tuple[int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """A pasted window placed in an all-False (H, W) image."""
    out = np.zeros(image_hw, bool)
    x, y = origin
    out[y : y + window.shape[0], x : x + window.shape[1]] = window
    return out
