"""COCO metrics against pycocotools itself on hand-made cases."""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from oilleak.evaluate.report import write_reports
from oilleak.evaluate.coco_eval import ImageResult, coco_evaluate, variant_groups
from oilleak.structures import Detections, ImageMeta

H, W = 48, 64


def _ellipse(cx, cy, rx, ry):
    yy, xx = np.mgrid[:H, :W]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_coco(class_names, cat_ids, objects) -> COCO:
    """objects: list of (image_id, class name, mask)."""
    id_of = dict(zip(class_names, cat_ids))
    image_ids = sorted({o[0] for o in objects} | {1, 2, 3})
    anns = []
    for ann_id, (image_id, name, mask) in enumerate(objects, start=1):
        x, y, w, h = (float(v) for v in mask_util.toBbox(_rle(mask)))
        anns.append(
            {"id": ann_id, "image_id": image_id, "category_id": id_of[name], "segmentation": _rle(mask),
             "area": float(mask.sum()), "bbox": [x, y, w, h], "iscrowd": 0}
        )
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in image_ids],
        "categories": [{"id": c, "name": n} for n, c in zip(class_names, cat_ids)],
        "annotations": anns,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def predictions(coco: COCO, class_names, cat_ids, dets_by_image) -> list[ImageResult]:
    """dets_by_image: image_id -> list of (class name, mask, score); goes through ImageResult.from_detections."""
    label_of = {n: k for k, n in enumerate(class_names)}
    out = []
    for image_id in sorted(coco.imgs):
        dets = sorted(dets_by_image.get(image_id, []), key=lambda d: -d[2])
        masks = torch.from_numpy(np.stack([d[1] for d in dets])) if dets else torch.zeros(0, H, W, dtype=torch.bool)
        boxes = []
        for _, mask, _ in dets:
            x, y, w, h = mask_util.toBbox(_rle(mask))
            boxes.append([x, y, x + w, y + h])
        meta = ImageMeta(image_id, f"{image_id}.jpg", (H, W), (H, W), (H, W), (1.0, 1.0))
        detections = Detections(
            torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            torch.tensor([d[2] for d in dets], dtype=torch.float32),
            torch.tensor([label_of[d[0]] for d in dets], dtype=torch.int64),
            masks,
        )
        out.append(ImageResult.from_detections(meta, detections))
    return out


def pycocotools_stats(coco: COCO, results: list[dict], iou_type: str, cat_ids: list[int]) -> np.ndarray:
    """The reference: pycocotools run directly, as its README shows."""
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco, dt, iou_type)
        ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def raw_results(coco: COCO, cat_ids_of, dets_by_image, iou_type):
    """Result entries built independently of oilleak (segm without bbox, as mmdetection evaluates)."""
    out = []
    for image_id, dets in dets_by_image.items():
        for name, mask, score in dets:
            entry = {"image_id": image_id, "category_id": cat_ids_of[name], "score": score}
            if iou_type == "bbox":
                entry["bbox"] = [float(v) for v in mask_util.toBbox(_rle(mask))]
            else:
                entry["segmentation"] = _rle(mask)
            out.append(entry)
    return out


# Three classes with COCO ids out of order (COCOeval sorts them; per-class rows must not shift);
# class "c" has no ground truth.
CLASSES = ["a", "b", "c"]
CAT_IDS = [7, 3, 5]
OBJECTS = [
    (1, "a", _ellipse(20, 20, 12, 9)),
    (1, "b", _ellipse(48, 30, 8, 12)),
    (2, "a", _ellipse(30, 24, 25, 18)),
    (2, "a", _ellipse(8, 8, 4, 3)),
    (3, "b", _ellipse(40, 20, 15, 10)),
]


@pytest.fixture()
def coco():
    return make_coco(CLASSES, CAT_IDS, OBJECTS)


def _gt_as_dets():
    dets = {}
    for image_id, name, mask in OBJECTS:
        dets.setdefault(image_id, []).append((name, mask, 0.9))
    return dets


def test_ground_truth_as_predictions_scores_one(coco):
    result = coco_evaluate(coco, predictions(coco, CLASSES, CAT_IDS, _gt_as_dets()), CLASSES, CAT_IDS)
    for iou_type in ("bbox", "segm"):
        assert result.metrics[f"{iou_type}_mAP"] == pytest.approx(1.0)
        assert result.metrics[f"{iou_type}_mAP_50"] == pytest.approx(1.0)
        a, b, c = result.per_class[iou_type]
        assert (a.name, a.num_gt, a.ap, a.ap50, a.ap75) == ("a", 3, pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))
        assert (b.name, b.num_gt, b.ap) == ("b", 2, pytest.approx(1.0))
        assert c.num_gt == 0 and math.isnan(c.ap)  # no GT: undefined, not 0
    assert result.merged is None  # no _dry / _susp variants among the classes


def _perturbed():
    """Shifted and shrunk masks, a duplicate, a miss, a wrong class and a false positive of the absent class."""
    return {
        1: [("a", _ellipse(22, 21, 12, 9), 0.8), ("b", _ellipse(48, 30, 6, 9), 0.7), ("a", _ellipse(47, 31, 8, 12), 0.3)],
        2: [("a", _ellipse(31, 24, 22, 18), 0.95), ("a", _ellipse(30, 24, 25, 18), 0.4), ("c", _ellipse(10, 40, 5, 5), 0.6)],
        3: [("a", _ellipse(40, 20, 15, 10), 0.9), ("b", _ellipse(44, 22, 15, 10), 0.5)],
    }


def test_perturbed_predictions_match_pycocotools(coco):
    dets = _perturbed()
    result = coco_evaluate(coco, predictions(coco, CLASSES, CAT_IDS, dets), CLASSES, CAT_IDS)
    ids = dict(zip(CLASSES, CAT_IDS))
    for iou_type in ("bbox", "segm"):
        ref = pycocotools_stats(coco, raw_results(coco, ids, dets, iou_type), iou_type, CAT_IDS)
        ours = [result.metrics[f"{iou_type}_{k}"] for k in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")]
        expected = [float("nan") if v < 0 else v for v in ref[:6]]
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
        assert 0.05 < result.metrics[f"{iou_type}_mAP"] < 0.95  # a real perturbation, not a trivial case
        # per class: pycocotools restricted to that one category
        for name, cat_id, row in zip(CLASSES, CAT_IDS, result.per_class[iou_type]):
            if name == "c":
                assert math.isnan(row.ap)
                continue
            single = pycocotools_stats(coco, raw_results(coco, ids, dets, iou_type), iou_type, [cat_id])
            assert row.ap == pytest.approx(single[0], abs=1e-12)
            assert row.ap50 == pytest.approx(single[1], abs=1e-12)
            assert row.ap75 == pytest.approx(single[2], abs=1e-12)
        # the overall mean is over the classes with GT only
        assert result.metrics[f"{iou_type}_mAP"] == pytest.approx(np.mean([r.ap for r in result.per_class[iou_type][:2]]))


def test_mask_areas_come_from_masks_not_boxes():
    """A false positive thin diagonal stain: its box is 'medium' but its mask is 'small'. For mask AP_m it
    is out of range and ignored; were the box area used (bbox left in segm results) it would count.
    mmdetection 3.3 sizes segm detections by mask area too: its CocoMetric.compute_metrics pops 'bbox' from
    every segm result before COCO.loadRes (mmdet/evaluation/metrics/coco_metric.py, lines 453-461)."""
    yy, xx = np.mgrid[:H, :W]
    diagonal = (np.abs(xx - yy) <= 1) & (xx < 40)  # ~118 px (< 32^2), box 40 x 40 (> 32^2)
    blob = _ellipse(38, 24, 24, 17)  # ~1280 px: medium
    gt = make_coco(["a"], [1], [(1, "a", blob)])
    dets = {1: [("a", diagonal, 0.9), ("a", blob, 0.5)]}
    result = coco_evaluate(gt, predictions(gt, ["a"], [1], dets), ["a"], [1])
    assert result.metrics["segm_mAP_m"] == pytest.approx(1.0)
    assert result.metrics["bbox_mAP_m"] < 0.9  # for boxes the false positive is medium and counts
    assert math.isnan(result.metrics["segm_mAP_s"])  # no small GT: undefined


def test_empty_predictions(coco):
    result = coco_evaluate(coco, predictions(coco, CLASSES, CAT_IDS, {}), CLASSES, CAT_IDS)
    for iou_type in ("bbox", "segm"):
        assert result.metrics[f"{iou_type}_mAP"] == 0.0
        a, b, c = result.per_class[iou_type]
        assert a.ap == 0.0 and b.ap == 0.0  # GT present, nothing found: 0
        assert math.isnan(c.ap)  # no GT: undefined


def test_absent_class_written_as_no_gt(coco, tmp_path):
    result = coco_evaluate(coco, predictions(coco, CLASSES, CAT_IDS, _perturbed()), CLASSES, CAT_IDS)
    paths = write_reports(result, tmp_path, extra={"split": "val"})
    payload = json.loads(paths[0].read_text())
    assert payload["split"] == "val"
    rows = {r["class"]: r for r in payload["per_class"]["segm"]}
    assert rows["c"]["AP"] is None and rows["c"]["num_gt"] == 0
    assert rows["a"]["AP"] == pytest.approx(result.per_class["segm"][0].ap)
    with paths[1].open() as f:
        table = {r["class"]: r for r in csv.DictReader(f)}
    assert table["c"]["mask AP"] == "no GT" and table["c"]["box AP"] == "no GT"
    assert float(table["b"]["mask AP"]) == pytest.approx(result.per_class["segm"][1].ap, abs=5e-4)
    assert "| c | 0 | no GT |" in paths[2].read_text()


SIX = ["x", "x_dry", "x_susp", "y", "y_dry", "y_susp"]
SIX_IDS = [1, 2, 3, 4, 5, 6]


def test_variant_groups():
    assert variant_groups(SIX) == {"x": ["x", "x_dry", "x_susp"], "y": ["y", "y_dry", "y_susp"]}
    assert variant_groups(["x", "y_dry", "z_susp"]) == {}  # variants without their base class do not merge
    assert variant_groups(["x", "x_susp", "q"]) == {"x": ["x", "x_susp"]}


def test_merged_variant_ap_matches_pycocotools_on_remapped_ids():
    objects = [
        (1, "x", _ellipse(16, 16, 10, 8)),
        (1, "y_dry", _ellipse(45, 30, 9, 9)),
        (2, "x_dry", _ellipse(30, 20, 14, 10)),
        (2, "y", _ellipse(10, 38, 6, 6)),
        (3, "x_susp", _ellipse(40, 24, 12, 12)),
        (3, "y_susp", _ellipse(12, 12, 7, 5)),
    ]
    coco = make_coco(SIX, SIX_IDS, objects)
    # every object found with the right base but, for three of them, the wrong variant
    dets = {
        1: [("x_dry", _ellipse(16, 16, 10, 8), 0.9), ("y_dry", _ellipse(46, 30, 9, 9), 0.8)],
        2: [("x", _ellipse(30, 21, 14, 10), 0.7), ("y", _ellipse(10, 38, 5, 6), 0.6), ("y_susp", _ellipse(50, 8, 4, 4), 0.5)],
        3: [("x_susp", _ellipse(40, 24, 12, 12), 0.9), ("y", _ellipse(12, 12, 7, 5), 0.4)],
    }
    result = coco_evaluate(coco, predictions(coco, SIX, SIX_IDS, dets), SIX, SIX_IDS)
    assert result.merged is not None and result.merged.class_names == ["x", "y"]

    # reference: the same inputs with variant ids rewritten by hand to their base ids
    base = {"x": 1, "x_dry": 1, "x_susp": 1, "y": 4, "y_dry": 4, "y_susp": 4}
    merged_gt = make_coco(["x", "y"], [1, 4], [(i, "x" if n.startswith("x") else "y", m) for i, n, m in objects])
    for iou_type in ("bbox", "segm"):
        raw = raw_results(merged_gt, base, dets, iou_type)
        ref = pycocotools_stats(merged_gt, raw, iou_type, [1, 4])
        assert result.merged.metrics[f"{iou_type}_mAP"] == pytest.approx(ref[0], abs=1e-12)
        for cat_id, row in zip([1, 4], result.merged.per_class[iou_type]):
            assert row.ap == pytest.approx(pycocotools_stats(merged_gt, raw, iou_type, [cat_id])[0], abs=1e-12)
        assert [r.num_gt for r in result.merged.per_class[iou_type]] == [3, 3]
    # merging forgives the variant confusions: the merged mask AP is far above the 6-class one
    assert result.merged.metrics["segm_mAP"] > result.metrics["segm_mAP"] + 0.2
