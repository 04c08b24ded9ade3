"""Prediction files, input discovery, tiling and its merge, with a deterministic stand-in predictor that
finds dark (class 0) and red (class 1) blobs, so every expected mask is known exactly."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from oilleak.predict.backends import Found
from oilleak.predict.detector import Detector
from oilleak.predict.instances import Instance, fill_holes, instances_from_detections, mask_polygons
from oilleak.predict.predictor import Source, find_images, fresh_dir, output_folders, predict_images
from oilleak.predict.tiling import merge_tiles, predict_tiled, same_object, tile_windows
from oilleak.structures import CroppedDetections

CLASSES = ["dark", "red"]


def find_blobs(image: np.ndarray) -> list[Instance]:
    """The stand-in predictor: each 8-connected dark or red region is one instance (score from its size)."""
    r, g, b = (image[..., c].astype(int) for c in range(3))
    out = []
    for label, region in enumerate([(r < 80) & (g < 80) & (b < 80), (r > 150) & (g < 80) & (b < 80)]):
        n, comp, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
        for k in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[k])
            out.append(Instance(label, min(0.99, 0.5 + area / 1e5), (x, y, x + w, y + h), comp[y : y + h, x : x + w] == k, (x, y)))
    return sorted(out, key=lambda i: -i.score)


class BlobBackend:
    """find_blobs behind the Backend interface, so the real Detector, files and summary run on top of it."""

    classes, scale, score_thr, device, batched = CLASSES, (0, 0), 0.3, torch.device("cpu"), False

    def info(self) -> dict:
        return {"checkpoint": "blobs"}

    def __call__(self, images, min_score):
        answers = []
        for image in images:
            found = find_blobs(image)
            answers.append(Found([i for i in found if i.score >= min_score], found[0].score if found else None))
        return answers


def blobs(score_thr: float = 0.3) -> Detector:
    return Detector.from_backend(BlobBackend(), score_thr)


def canvas(height, width):
    return np.full((height, width, 3), 200, np.uint8)


def draw_ellipse(image, centre, axes, colour, angle=0):
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, -1)
    image[mask.astype(bool)] = colour
    return mask.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def rasterise(polygons, height, width) -> np.ndarray:
    """pycocotools' rasterisation, the one `oilleak convert` and the dataset use."""
    flat = [[v for point in poly for v in point] for poly in polygons]
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(flat, height, width))).astype(bool)


# --- polygons -------------------------------------------------------------------------------------


@pytest.mark.parametrize("axes", [(1, 1), (3, 2), (12, 5), (40, 25)])
def test_polygons_rasterise_back_to_the_mask(axes):
    image = canvas(100, 120)
    truth = draw_ellipse(image, (60, 50), axes, (0, 0, 0), angle=30)
    draw_ellipse(image, (15, 15), (6, 6), (0, 0, 0))  # a second, separate instance
    (inst,) = [i for i in find_blobs(image) if i.full_mask(100, 120)[50, 60]]
    polygons = mask_polygons(inst)
    assert len(polygons) == 1 and len(polygons[0]) >= 3
    assert iou(rasterise(polygons, 100, 120), truth) >= 0.99


def test_mask_in_two_parts_gives_two_polygons():
    mask = np.zeros((20, 30), bool)
    mask[2:8, 2:10] = True
    mask[12:18, 15:28] = True
    inst = Instance(0, 0.9, (2, 2, 28, 18), mask, (5, 7))
    polygons = mask_polygons(inst)
    assert len(polygons) == 2
    full = np.zeros((40, 50), bool)
    full[7:27, 5:35] = mask
    assert iou(rasterise(polygons, 40, 50), full) == 1.0


def test_holes_are_filled_so_outline_area_and_mask_agree(tmp_path):
    image = canvas(80, 80)
    ring = draw_ellipse(image, (40, 40), (25, 20), (0, 0, 0))
    hole = draw_ellipse(image, (40, 40), (8, 6), (200, 200, 200))
    src = _png(tmp_path / "ring.png", image)
    out = tmp_path / "out"
    predict_images(blobs(), [Source(src, "ring")], out, progress=False)
    (inst,) = json.loads((out / "instances" / "ring.json").read_text())["instances"]
    assert inst["area_px"] == int(ring.sum()) == int((ring & ~hole).sum() + hole.sum())
    assert iou(rasterise(inst["polygons"], 80, 80), ring) == 1.0
    (found,) = find_blobs(image)
    assert fill_holes(found).area == ring.sum() > found.area


def test_detections_become_instances_at_the_threshold():
    """Each window is cut down to its mask's extent; the origin moves with the cut."""
    crops = [torch.zeros(5, 8, dtype=torch.bool), torch.zeros(6, 6, dtype=torch.bool), torch.ones(2, 2, dtype=torch.bool)]
    crops[0][1:4, 1:7] = True  # crops[1] is empty: nothing to outline
    dets = CroppedDetections(torch.tensor([[3.0, 2, 9, 5], [0, 0, 4, 4], [0, 0, 2, 2]]), torch.tensor([0.9, 0.8, 0.3]),
                             torch.tensor([1, 0, 0]), crops, [(2, 1), (0, 0), (0, 0)])
    kept = instances_from_detections(dets, score_thr=0.5)
    assert [(i.label, i.score, i.origin, i.mask.shape, i.area) for i in kept] == [(1, pytest.approx(0.9), (3, 2), (3, 6), 18)]
    assert len(instances_from_detections(dets, score_thr=0.3)) == 2


# --- inputs and output names ----------------------------------------------------------------------


def _png(path, image=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas(20, 30) if image is None else image).save(path)
    return path


def test_find_images_folders_globs_files_and_name_clashes(tmp_path):
    a = _png(tmp_path / "a" / "img.png")
    b = _png(tmp_path / "b" / "img.png")
    c = _png(tmp_path / "b" / "deep" / "x.jpg")
    d = _png(tmp_path / "b" / "img.jpg")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    sources, problems = find_images([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "missing.png"),
                                     str(tmp_path / "a" / "*.bmp"), str(tmp_path / "**" / "x.jpg")])
    names = {s.path: s.name for s in sources}
    assert set(names) == {a, b, c, d}  # x.jpg reached twice (folder and glob): predicted once
    assert names[c] == "deep/x"  # folders keep their sub-folders
    assert sorted([names[a], names[b], names[d]]) == ["img", "img-2", "img-3"]  # no clash loses an image
    assert [p[0] for p in problems] == [str(tmp_path / "missing.png"), str(tmp_path / "a" / "*.bmp")]


def test_fresh_dir_and_earlier_outputs_are_not_inputs(tmp_path):
    out = tmp_path / "predictions"
    assert fresh_dir(out) == out
    _png(out / "overlays" / "x.jpg")
    assert fresh_dir(out) == tmp_path / "predictions-2"
    _png(tmp_path / "predictions-2" / "overlays" / "y.jpg")
    assert fresh_dir(out) == tmp_path / "predictions-3"
    photo = _png(tmp_path / "photo.png")
    sources, _ = find_images([str(tmp_path)], exclude=output_folders(out))
    assert [s.path for s in sources] == [photo]


# --- a whole run with the stand-in predictor ------------------------------------------------------


def test_predict_images_writes_overlays_json_summary_and_skips_unreadable(tmp_path):
    image = canvas(90, 120)
    dark = draw_ellipse(image, (40, 40), (20, 12), (10, 10, 10))
    red = draw_ellipse(image, (95, 65), (10, 8), (230, 20, 20))
    good = _png(tmp_path / "in" / "good.png", image)
    empty = _png(tmp_path / "in" / "empty.png")
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    sources, _ = find_images([str(tmp_path / "in")])
    out = tmp_path / "out"
    report = predict_images(blobs(), sources, out, progress=False)

    assert report.processed == 2 and report.instances == 2
    assert [f[0] for f in report.failures] == [str(broken)] and "cannot read image" in report.failures[0][1]
    record = json.loads((out / "instances" / "good.json").read_text())
    assert (record["width"], record["height"]) == (120, 90)
    by_class = {i["class"]: i for i in record["instances"]}
    assert by_class["dark"]["area_px"] == int(dark.sum()) and by_class["red"]["area_px"] == int(red.sum())
    assert by_class["red"]["area_share"] == pytest.approx(red.sum() / (90 * 120))
    assert record["leak_area_px"] == int((dark | red).sum())
    assert record["leak_area_share_per_class"] == pytest.approx({"dark": dark.sum() / (90 * 120), "red": red.sum() / (90 * 120)})
    assert iou(rasterise(by_class["dark"]["polygons"], 90, 120), dark) >= 0.99
    x1, y1, x2, y2 = by_class["red"]["box"]
    assert (x1, y1, x2, y2) == (85, 57, 106, 74)
    assert json.loads((out / "instances" / "empty.json").read_text())["instances"] == []

    overlay = np.array(Image.open(out / "overlays" / "good.jpg"))
    assert overlay.shape == image.shape
    assert np.abs(overlay[40, 40].astype(int) - image[40, 40]).sum() > 60  # the mask is painted over the stain

    with (out / "summary.csv").open() as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert rows["good"]["n_dark"] == "1" and rows["good"]["n_red"] == "1" and rows["good"]["status"] == "ok"
    assert float(rows["good"]["leak_area_share"]) == pytest.approx((dark | red).sum() / (90 * 120), abs=1e-6)
    assert rows["empty"]["instances"] == "0"
    assert rows["broken"]["status"].startswith("failed: cannot read image")
    assert not (out / "labelme").exists()  # only with save_labelme


def test_labelme_files_point_to_a_copy_of_the_image(tmp_path):
    image = canvas(60, 80)
    draw_ellipse(image, (30, 30), (12, 9), (0, 0, 0))
    src = _png(tmp_path / "photo.png", image)
    out = tmp_path / "out"
    predict_images(blobs(), [Source(src, "photo")], out, save_labelme=True, progress=False)
    data = json.loads((out / "labelme" / "photo.json").read_text())
    assert data["imagePath"] == "photo.png" and data["imageData"] is None
    assert (out / "labelme" / "photo.png").read_bytes() == src.read_bytes()
    assert (data["imageHeight"], data["imageWidth"]) == (60, 80)
    (shape,) = data["shapes"]
    assert shape["label"] == "dark" and shape["shape_type"] == "polygon" and shape["group_id"] == 1


# --- tiling ---------------------------------------------------------------------------------------


def test_tile_windows_cover_the_image_with_overlap():
    windows = tile_windows(1000, 1500, 400)
    covered = np.zeros((1000, 1500), int)
    for x0, y0, x1, y1 in windows:
        assert x1 - x0 == 400 and y1 - y0 == 400
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    xs = sorted({w[0] for w in windows})
    assert all(b - a <= 320 for a, b in zip(xs, xs[1:]))  # at least 20% of 400 shared
    assert tile_windows(300, 200, 400) == [(0, 0, 200, 300)]  # smaller than a tile: one window


def test_tiled_object_across_tile_borders_is_found_once(tmp_path):
    image = canvas(700, 900)
    windows = tile_windows(700, 900, 400)
    assert (320, 0, 720, 400) in windows and (0, 0, 400, 400) in windows
    # an object across the vertical border at x=400 (first tile's edge), one on the corner of four tiles,
    # and two small separate stains of the same class close together inside the overlap strip
    across = draw_ellipse(image, (420, 150), (140, 40), (0, 0, 0))
    corner = draw_ellipse(image, (330, 330), (60, 60), (230, 20, 20))
    left = draw_ellipse(image, (350, 550), (8, 8), (0, 0, 0))
    right = draw_ellipse(image, (375, 550), (8, 8), (0, 0, 0))
    whole = find_blobs(image)
    tiled = predict_tiled(image, find_blobs, 400)
    assert len(whole) == 4
    assert len(tiled) == 4  # not one per tile that sees a part
    masks = [i.full_mask(700, 900) for i in tiled]
    for truth, label in ((across, 0), (corner, 1), (left, 0), (right, 0)):
        (match,) = [(m, i) for m, i in zip(masks, tiled) if (m & truth).any()]
        assert match[1].label == label
        assert iou(match[0], truth) == 1.0  # the union of the tile pieces is the whole object
        ys, xs = np.nonzero(truth)
        assert match[1].box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_pieces_are_merged_only_within_the_shared_area_and_same_class():
    left_tile, right_tile = (0, 0, 200, 100), (180, 0, 380, 100)
    shared = (180, 0, 200, 100)
    # one long stain from x=20 to x=330: the left tile sees 20..200, the right tile 180..330
    a = Instance(0, 0.8, (20, 40, 200, 50), np.ones((10, 180), bool), (20, 40))
    b = Instance(0, 0.6, (180, 40, 330, 50), np.ones((10, 150), bool), (180, 40))
    # in the shared strip they agree, though only 20 of the smaller piece's 150 columns overlap overall
    assert same_object(a, b, shared)
    c = Instance(1, 0.6, (180, 40, 330, 50), np.ones((10, 150), bool), (180, 40))
    assert not same_object(a, c, shared)  # another class
    d = Instance(0, 0.6, (185, 70, 220, 80), np.ones((10, 35), bool), (185, 70))
    assert not same_object(a, d, shared)  # no overlap
    (merged,) = merge_tiles([(left_tile, [a]), (right_tile, [b])])
    assert merged.score == 0.8 and merged.box == (20, 40, 330, 50) and merged.area == 3100
    # instances of the same tile are never merged, however they overlap
    assert len(merge_tiles([(left_tile, [a, a])])) == 2


def test_device_option_errors_name_the_fix():
    from oilleak.distributed import resolve_device
    from oilleak.errors import OilleakError

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(OilleakError, match="'gpu' is not a device; use cpu, cuda or cuda:N"):
        resolve_device("gpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(OilleakError, match="use --device cpu" if count == 0 else r"only \d+ GPU\(s\) are visible"):
        resolve_device(f"cuda:{count}")  # one past the last GPU: refused before any model is moved there


def test_progress_goes_to_a_log_file_as_lines(tmp_path, capsys):
    """Output captured (not a terminal, as under nohup or CI): progress lines appear as images are done."""
    sources = [Source(_png(tmp_path / f"{k}.png", canvas(40, 40)), str(k)) for k in range(3)]
    predict_images(blobs(), sources, tmp_path / "out", progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("predicting")]
    assert lines[0].startswith("predicting 1/3 (33%)") and lines[-1].startswith("predicting 3/3 (100%)")


def test_an_overlay_without_instances_says_so(tmp_path):
    image = canvas(120, 160)  # nothing dark or red: the stand-in finds nothing
    src = _png(tmp_path / "clean.png", image)
    report = predict_images(blobs(), [Source(src, "clean")], tmp_path / "out", progress=False)
    assert (report.instances, report.top_score) == (0, None)  # the stand-in gives no scores below its threshold
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / "clean.jpg")).astype(int)
    assert overlay[:3].mean() < 60  # a dark banner across the top, white letters on it
    assert (overlay[:12] > 200).any()
    assert np.abs(overlay[40:] - image[40:]).max() <= 8  # below it, the photo (JPEG rounding only)
