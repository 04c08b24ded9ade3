"""What `oilleak test` writes besides the metrics: confusion matrix, plots, detections files, pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from oilleak.evaluate.confusion import confusion_matrix
from oilleak.evaluate.coco_eval import coco_evaluate
from oilleak.evaluate.run import check_out_path, write_detections
from oilleak.evaluate.plots import plot_confusion_matrix, plot_pr_curves
from oilleak.errors import OilleakError
from tests.test_evaluate import CAT_IDS, CLASSES, OBJECTS, _ellipse, _perturbed, make_coco, predictions, pycocotools_stats


def test_confusion_matrix_hand_counted():
    a1, b1, a2 = _ellipse(16, 16, 10, 8), _ellipse(45, 30, 9, 9), _ellipse(30, 20, 14, 10)
    coco = make_coco(["a", "b"], [1, 2], [(1, "a", a1), (1, "b", b1), (2, "a", a2)])
    dets = {
        1: [
            ("b", a1, 0.9),  # an "a" stain called "b": off the diagonal
            ("b", b1, 0.8),  # right
            ("a", _ellipse(50, 8, 4, 4), 0.7),  # matches nothing: a false alarm
            ("a", b1, 0.6),  # a duplicate of b1, already matched: a false alarm too
            ("a", a1, 0.1),  # under the score threshold: not counted
        ],
        2: [],  # a2 missed
    }
    matrix = confusion_matrix(coco, predictions(coco, ["a", "b"], [1, 2], dets), [1, 2], score_thr=0.3)
    expected = np.array([
        # pred a, pred b, background (missed)
        [0, 1, 1],  # GT a
        [0, 1, 0],  # GT b
        [2, 0, 0],  # background: false alarms
    ])
    np.testing.assert_array_equal(matrix, expected)
    # the diagonal of ground truth used as predictions is everything
    perfect = confusion_matrix(coco, predictions(coco, ["a", "b"], [1, 2], {1: [("a", a1, 1.0), ("b", b1, 1.0)], 2: [("a", a2, 1.0)]}), [1, 2], 0.3)
    np.testing.assert_array_equal(perfect, np.diag([2, 1, 0]))


def test_plots_are_written(tmp_path):
    coco = make_coco(CLASSES, CAT_IDS, OBJECTS)
    images = predictions(coco, CLASSES, CAT_IDS, _perturbed())
    result = coco_evaluate(coco, images, CLASSES, CAT_IDS)
    paths = plot_pr_curves(result, tmp_path)
    paths.append(plot_confusion_matrix(confusion_matrix(coco, images, CAT_IDS, 0.3), CLASSES, tmp_path / "cm.png", 0.3))
    assert [p.name for p in paths] == ["pr_curves_bbox.png", "pr_curves_segm.png", "cm.png"]
    for path in paths:
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 300
            pixels = np.asarray(im.convert("RGB"))
            assert pixels.std() > 10  # something is drawn


def test_detections_json_reproduces_the_metrics(tmp_path):
    coco = make_coco(CLASSES, CAT_IDS, OBJECTS)
    images = predictions(coco, CLASSES, CAT_IDS, _perturbed())
    result = coco_evaluate(coco, images, CLASSES, CAT_IDS)
    out = tmp_path / "dets.json"
    write_detections(out, images, CAT_IDS)
    entries = json.loads(out.read_text())
    assert len(entries) == sum(len(r.scores) for r in images)
    assert {e["category_id"] for e in entries} <= set(CAT_IDS)
    boxes = [{k: v for k, v in e.items() if k != "segmentation"} for e in entries]
    masks = [{k: v for k, v in e.items() if k != "bbox"} for e in entries]
    assert pycocotools_stats(coco, boxes, "bbox", CAT_IDS)[0] == pytest.approx(result.metrics["bbox_mAP"], abs=1e-12)
    assert pycocotools_stats(coco, masks, "segm", CAT_IDS)[0] == pytest.approx(result.metrics["segm_mAP"], abs=1e-12)


def test_out_path_is_checked_before_anything_runs(tmp_path):
    existing = tmp_path / "test.pkl"
    existing.write_bytes(b"user data")
    with pytest.raises(OilleakError, match="already exists.*--overwrite"):
        check_out_path(existing, overwrite=False)
    check_out_path(existing, overwrite=True)
    with pytest.raises(OilleakError, match=r"\.json.*\.pkl"):
        check_out_path(tmp_path / "test.txt", overwrite=False)
    assert existing.read_bytes() == b"user data"


def test_show_paths_keep_dataset_names_unique(tmp_path):
    from oilleak.evaluate.run import show_paths

    paths = show_paths(tmp_path, [(1, "a.jpg"), (2, "a.png"), (3, "sub/a.jpg"), (4, "b.tif")])
    assert paths == {1: tmp_path / "a.jpg", 2: tmp_path / "a.png", 3: tmp_path / "sub" / "a.jpg", 4: tmp_path / "b.tif.png"}
