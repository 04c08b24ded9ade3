"""`oilleak test --out FILE.pkl` writes mmdetection 3.3's result pickle (what its ``DumpDetResults`` dumps
for ``tools/test.py --out``). Read back the way mmdetection's tools read it -- ``eval_metric.py`` hands each
dict to ``CocoMetric.process`` (``pred['bboxes'].cpu().numpy()``, RLE counts as bytes, ``img_id``) and
``confusion_matrix.py`` takes ``per_img_res['pred_instances']`` by dataset index -- without mmdetection
installed, and checked against independent truths: the dataset's own transform metas, the COCO results JSON
of the same run, the ground truth masks, and pycocotools on the pickle giving metrics.json's numbers.
bench/mmdet_tools_check.py runs mmdetection's own tools on such a file."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from oilleak.data.dataset import build_dataset
from oilleak.data.labelme import convert_labelme
from oilleak.errors import OilleakError
from oilleak.evaluate import run as evaluate_run
from oilleak.evaluate.run import check_out_path, run_test
from oilleak.structures import Detections
from tests.test_evaluate import pycocotools_stats
from tests.test_evaluate_run import GroundTruthModel, make_config

KEYS = {"img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "batch_input_shape", "pad_shape", "pred_instances"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, sample_dir):
    root = tmp_path_factory.mktemp("bsdata_mmdet") / "data"
    convert_labelme(sample_dir, root, classes=["Pitting"], val_fraction=0.3, seed=0)
    return root


class ShiftedGroundTruth(GroundTruthModel):
    """The ground truth moved by a few pixels per instance (boxes and masks alike), plus one false alarm per
    image: box and mask AP strictly between 0 and 1, so equal metrics mean something."""

    def forward(self, images, metas, targets=None):
        out = []
        for meta, dets in zip(metas, super().forward(images, metas, targets)):
            h, w = meta.ori_shape
            shifts = [3 * (i % 4) for i in range(len(dets))]
            masks = [torch.roll(m, s, dims=1) for m, s in zip(dets.masks, shifts)]
            boxes = [b + torch.tensor([s, 0.0, s, 0.0]) for b, s in zip(dets.boxes, shifts)]
            alarm = torch.zeros(h, w, dtype=torch.bool)
            alarm[: h // 4, : w // 4] = True
            masks.append(alarm)
            boxes.append(torch.tensor([0.0, 0.0, w / 4, h / 4]))
            scores = torch.cat([dets.scores, torch.tensor([0.7])])
            labels = torch.cat([dets.labels, torch.tensor([0])])
            order = torch.argsort(scores, descending=True)
            out.append(Detections(torch.stack(boxes)[order], scores[order], labels[order], torch.stack(masks)[order]))
        return out


def _run(config, tmp_path, monkeypatch, out, model_cls=ShiftedGroundTruth):
    def fake_load(ckpt, cfg, overrides):
        ds = build_dataset(cfg.data, "val", train=False)
        return model_cls(ds.coco, ds.cat_ids), "", cfg

    monkeypatch.setattr(evaluate_run, "load_model_for_test", fake_load)
    outcome = run_test(config, tmp_path / "unused.pth", work_dir=tmp_path / out.stem, out=out, progress=False)
    return json.loads((outcome.report_dir / "metrics.json").read_text())


def _load_as_mmdet(path):
    with path.open("rb") as f:  # mmengine.load of a .pkl / .pickle: pickle.load
        return pickle.load(f)


def coco_metric_results(samples, cat_ids):
    """What mmdetection's CocoMetric.process + results2json make of the pickle's dicts (mmdet 3.3), segm
    entries without their box (as its compute_metrics drops it)."""
    bbox, segm = [], []
    for sample in samples:
        pred = sample["pred_instances"]
        boxes, scores, labels = (pred[k].cpu().numpy() for k in ("bboxes", "scores", "labels"))
        for box, score, label, rle in zip(boxes, scores, labels, pred["masks"]):
            x1, y1, x2, y2 = box.tolist()
            common = {"image_id": sample["img_id"], "score": float(score), "category_id": cat_ids[label]}
            bbox.append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
            counts = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
            segm.append({**common, "segmentation": {"size": rle["size"], "counts": counts}})
    return bbox, segm


def test_pickle_is_mmdetections_result_format(data_root, tmp_path, monkeypatch):
    config = make_config(data_root)
    dataset = build_dataset(config.data, "val", train=False)
    metrics = _run(config, tmp_path, monkeypatch, tmp_path / "test.pkl")
    samples = _load_as_mmdet(tmp_path / "test.pkl")

    # one dict per image in the annotation file's order (mmdet's CocoDataset order, which confusion_matrix.py
    # indexes by), the ground truth keys gone
    assert isinstance(samples, list) and [s["img_id"] for s in samples] == dataset.coco.getImgIds()
    for index, sample in enumerate(samples):
        assert set(sample) == KEYS
        record = dataset.records[index]
        meta = dataset[index].meta  # the test transform as it ran: independent of the writer's arithmetic
        assert sample["img_path"] == str(record.path) and record.path.is_file()
        assert sample["ori_shape"] == (record.height, record.width) == tuple(meta.ori_shape)
        assert sample["img_shape"] == tuple(meta.img_shape) == tuple(dataset[index].image.shape[1:])
        assert sample["scale_factor"] == pytest.approx(meta.scale_factor, abs=0) and len(sample["scale_factor"]) == 2
        assert sample["pad_shape"] == sample["batch_input_shape"] == tuple(meta.pad_shape)
        assert all(type(v) is int for k in ("ori_shape", "img_shape", "pad_shape", "batch_input_shape") for v in sample[k])
        assert all(type(v) is float for v in sample["scale_factor"]) and type(sample["img_id"]) is int

        pred = sample["pred_instances"]
        assert set(pred) == {"bboxes", "scores", "labels", "masks"}
        n = len(pred["masks"])
        assert n > 1
        for key, dtype, shape in (("bboxes", torch.float32, (n, 4)), ("scores", torch.float32, (n,)), ("labels", torch.int64, (n,))):
            assert isinstance(pred[key], torch.Tensor) and pred[key].dtype == dtype and tuple(pred[key].shape) == shape
        for rle in pred["masks"]:  # pycocotools.mask.encode's own output, as encode_mask_results leaves it
            assert set(rle) == {"size", "counts"} and rle["size"] == [record.height, record.width]
            assert isinstance(rle["counts"], bytes)
        # what confusion_matrix.py does with it
        labels = np.unique(pred["labels"].numpy())
        assert pred["bboxes"][pred["labels"] == labels[0]].numpy().shape[1] == 4

    # the same run's COCO results JSON: the same boxes, scores, classes and masks
    _run(config, tmp_path, monkeypatch, tmp_path / "test.json")
    entries = json.loads((tmp_path / "test.json").read_text())
    bbox, segm = coco_metric_results(samples, dataset.cat_ids)
    assert len(entries) == len(bbox) == len(segm)
    for entry, box, seg in zip(entries, bbox, segm):
        assert (entry["image_id"], entry["category_id"]) == (box["image_id"], box["category_id"])
        assert box["score"] == pytest.approx(entry["score"], abs=1e-7)
        np.testing.assert_allclose(box["bbox"], entry["bbox"], atol=1e-4)
        assert seg["segmentation"] == entry["segmentation"]

    # pycocotools on the pickle as CocoMetric feeds it: metrics.json's numbers, and not a trivial 0 or 1
    box_ap = pycocotools_stats(dataset.coco, bbox, "bbox", dataset.cat_ids)[0]
    mask_ap = pycocotools_stats(dataset.coco, segm, "segm", dataset.cat_ids)[0]
    assert box_ap == pytest.approx(metrics["metrics"]["bbox_mAP"], abs=1e-12)
    assert mask_ap == pytest.approx(metrics["metrics"]["segm_mAP"], abs=1e-12)
    assert 0.05 < box_ap < 0.95 and 0.05 < mask_ap < 0.95


def test_pickle_suffix_and_masks_are_the_ground_truth(data_root, tmp_path, monkeypatch):
    config = make_config(data_root)
    dataset = build_dataset(config.data, "val", train=False)
    out = tmp_path / "test.pickle"
    _run(config, tmp_path, monkeypatch, out, model_cls=GroundTruthModel)
    samples = _load_as_mmdet(out)
    coco = dataset.coco
    for sample in samples:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[sample["img_id"]], iscrowd=False))
        pred = sample["pred_instances"]
        assert len(pred["masks"]) == len(anns)
        truth = np.stack([coco.annToMask(a) for a in anns])
        np.testing.assert_array_equal(mask_util.decode(pred["masks"]).transpose(2, 0, 1), truth)
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns])
        np.testing.assert_allclose(pred["bboxes"].numpy(), boxes, atol=1e-4)


def test_out_suffixes_are_checked_and_named(tmp_path):
    for name in ("x.pkl", "x.PICKLE", "x.json"):
        check_out_path(tmp_path / name, overwrite=False)
    with pytest.raises(OilleakError, match=r"\.json.*\.pkl.*\.pickle"):
        check_out_path(tmp_path / "x.npz", overwrite=False)
    with pytest.raises(OilleakError, match=r"\.json.*\.pkl.*\.pickle"):  # refused before any data or model is read
        run_test(make_config(tmp_path / "no_data"), tmp_path / "unused.pth", out=tmp_path / "x.txt", progress=False)
