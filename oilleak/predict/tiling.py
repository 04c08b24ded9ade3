"""Sliding-window prediction for images too large to predict whole (``oilleak predict --tile SIZE``).

The image is cut into SIZE x SIZE tiles that overlap by ``overlap`` (20%) of SIZE; the last tile of a row or
column is moved back to end at the image border. Each tile is predicted on its own (resized to the model's
scale like any image) and its instances are moved back into image pixels.

Merge rule, for objects seen by more than one tile: two instances from different tiles are the same object
when they have the same class and, inside the area both tiles cover, at least half of the smaller one's
pixels lie inside the other one. Such pairs are joined transitively (an object over a tile corner is seen
by four tiles) and each group becomes one instance: the union of the masks, the box around the boxes, the
best score. Comparing only inside the shared area is what lets the two halves of an object cut by a tile
border match: outside it each tile sees a different part. Instances of one tile are never merged with each
other: the model's own NMS has already decided those.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from oilleak.predict.instances import Instance

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) in image pixels
MATCH_THRESHOLD = 0.5


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(1, tile - round(tile * overlap))
    return list(range(0, length - tile, stride)) + [length - tile]


def tile_windows(height: int, width: int, tile: int, overlap: float = 0.2) -> list[Window]:
    return [
        (x, y, min(x + tile, width), min(y + tile, height))
        for y in _starts(height, tile, overlap)
        for x in _starts(width, tile, overlap)
    ]


def _extent(inst: Instance) -> Window:
    x, y = inst.origin
    h, w = inst.mask.shape
    return x, y, x + w, y + h


def _intersect(a: Window, b: Window) -> Window | None:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _pixels_in(inst: Instance, region: Window) -> np.ndarray:
    """The instance's mask over ``region`` (zeros where its crop does not reach)."""
    out = np.zeros((region[3] - region[1], region[2] - region[0]), bool)
    part = _intersect(_extent(inst), region)
    if part is not None:
        x, y = inst.origin
        out[part[1] - region[1] : part[3] - region[1], part[0] - region[0] : part[2] - region[0]] = inst.mask[
            part[1] - y : part[3] - y, part[0] - x : part[2] - x
        ]
    return out


def same_object(a: Instance, b: Instance, shared: Window, threshold: float = MATCH_THRESHOLD) -> bool:
    """The merge rule (module docstring) for instances of two tiles whose windows share ``shared``."""
    if a.label != b.label or _intersect(_extent(a), _extent(b)) is None:
        return False
    pa, pb = _pixels_in(a, shared), _pixels_in(b, shared)
    smaller = min(int(pa.sum()), int(pb.sum()))
    return smaller > 0 and int((pa & pb).sum()) >= threshold * smaller


def _union(group: list[Instance]) -> Instance:
    extents = [_extent(i) for i in group]
    x0, y0 = min(e[0] for e in extents), min(e[1] for e in extents)
    x1, y1 = max(e[2] for e in extents), max(e[3] for e in extents)
    mask = np.zeros((y1 - y0, x1 - x0), bool)
    for inst, (ex0, ey0, ex1, ey1) in zip(group, extents):
        mask[ey0 - y0 : ey1 - y0, ex0 - x0 : ex1 - x0] |= inst.mask
    box = (min(i.box[0] for i in group), min(i.box[1] for i in group), max(i.box[2] for i in group), max(i.box[3] for i in group))
    return Instance(group[0].label, max(i.score for i in group), box, mask, (x0, y0))


def _candidates(a: list[Instance], b: list[Instance], shared: Window) -> list[tuple[int, int]]:
    """Pairs (i, j) of the same class whose extents overlap each other and the shared area: the only
    ones `same_object` can accept (a vectorised filter, so large tiled images stay fast)."""
    if not a or not b:
        return []
    ea, eb = np.array([_extent(i) for i in a]), np.array([_extent(i) for i in b])
    la, lb = np.array([i.label for i in a]), np.array([i.label for i in b])
    x0, y0, x1, y1 = shared
    in_a = (ea[:, 0] < x1) & (ea[:, 2] > x0) & (ea[:, 1] < y1) & (ea[:, 3] > y0)
    in_b = (eb[:, 0] < x1) & (eb[:, 2] > x0) & (eb[:, 1] < y1) & (eb[:, 3] > y0)
    overlap = (ea[:, None, 0] < eb[None, :, 2]) & (eb[None, :, 0] < ea[:, None, 2])
    overlap &= (ea[:, None, 1] < eb[None, :, 3]) & (eb[None, :, 1] < ea[:, None, 3])
    keep = overlap & (la[:, None] == lb[None, :]) & in_a[:, None] & in_b[None, :]
    return list(zip(*np.nonzero(keep)))


def merge_tiles(tiles: list[tuple[Window, list[Instance]]], threshold: float = MATCH_THRESHOLD) -> list[Instance]:
    """Instances of all tiles (already in image pixels) with each object seen by several tiles kept once."""
    offsets = np.cumsum([0] + [len(instances) for _, instances in tiles])
    flat = [inst for _, instances in tiles for inst in instances]
    parent = list(range(len(flat)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for ti, (window_i, instances_i) in enumerate(tiles):
        for tj in range(ti + 1, len(tiles)):
            window_j, instances_j = tiles[tj]
            shared = _intersect(window_i, window_j)
            if shared is None:
                continue
            for i, j in _candidates(instances_i, instances_j, shared):
                if same_object(instances_i[i], instances_j[j], shared, threshold):
                    parent[root(int(offsets[tj] + j))] = root(int(offsets[ti] + i))
    groups: dict[int, list[Instance]] = {}
    for i, inst in enumerate(flat):
        groups.setdefault(root(i), []).append(inst)
    merged = [g[0] if len(g) == 1 else _union(g) for g in groups.values()]
    return sorted(merged, key=lambda inst: -inst.score)


def predict_tiled(
    image: np.ndarray, predict: Callable[[np.ndarray], list[Instance]], tile: int, overlap: float = 0.2
) -> list[Instance]:
    """``predict`` (an RGB array -> instances in its pixels) applied tile by tile, merged over the image."""
    height, width = image.shape[:2]
    tiles = []
    for window in tile_windows(height, width, tile, overlap):
        x0, y0, x1, y1 = window
        instances = predict(np.ascontiguousarray(image[y0:y1, x0:x1]))
        tiles.append((window, [inst.shifted(x0, y0) for inst in instances]))
    return merge_tiles(tiles)
