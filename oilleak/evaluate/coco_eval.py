"""COCO box and mask metrics with pycocotools: overall, per class, and with dry / suspected variants merged.

The metric names follow mmdetection (``bbox_mAP``, ``bbox_mAP_50``, ..., ``segm_mAP_l``) so numbers can be
compared with an mmdetection log line by line. A value is NaN where COCO leaves it undefined: a class with
no ground truth in the split ("no GT", never 0), or a size bucket without ground truth.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.console import Console
from torch import nn
from torch.utils.data import DataLoader, Subset

from oilleak import distributed
from oilleak.distributed import Runtime
from oilleak.progress import progress_bar
from oilleak.structures import Detections, ImageMeta

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats positions of the numbers reported, with mmdetection's suffixes.
SUMMARY_STATS = {"mAP": 0, "mAP_50": 1, "mAP_75": 2, "mAP_s": 3, "mAP_m": 4, "mAP_l": 5}
# The dry / suspected variants of a class X are named X_dry and X_susp (see `variant_groups`).
VARIANT_SUFFIXES = ("_dry", "_susp")


@dataclass
class ImageResult:
    """The detections of one image, compact enough to keep for a whole split (masks as COCO RLE)."""

    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray  # (n, 4) float32, x1 y1 x2 y2 in original pixels
    scores: np.ndarray  # (n,) float32
    labels: np.ndarray  # (n,) int64, 0-based
    masks: list[dict]  # n COCO RLEs, counts as str (JSON-ready)

    @classmethod
    def from_detections(cls, meta: ImageMeta, dets: Detections) -> ImageResult:
        dets = dets.to("cpu")
        height, width = meta.ori_shape
        masks = dets.masks.numpy().astype(np.uint8).transpose(1, 2, 0)  # (H, W, n): pycocotools' layout
        rles = mask_util.encode(np.asfortranarray(masks)) if len(dets) else []
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
        return cls(
            image_id=meta.image_id,
            file_name=meta.file_name,
            height=height,
            width=width,
            boxes=dets.boxes.numpy().astype(np.float32).reshape(-1, 4),
            scores=dets.scores.numpy().astype(np.float32),
            labels=dets.labels.numpy().astype(np.int64),
            masks=list(rles),
        )

    def coco_results(self, cat_ids: list[int], iou_type: str) -> list[dict]:
        """COCO result entries. Mask entries carry no ``bbox``: pycocotools would then take the box area
        instead of the mask area for the small / medium / large buckets."""
        out = []
        for i in range(len(self.scores)):
            entry = {"image_id": self.image_id, "category_id": cat_ids[int(self.labels[i])], "score": float(self.scores[i])}
            if iou_type == "bbox":
                x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
                entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                entry["segmentation"] = self.masks[i]
            out.append(entry)
        return out


@dataclass
class ClassAP:
    name: str
    num_gt: int
    ap: float  # NaN: no ground truth of this class in the split
    ap50: float
    ap75: float


@dataclass
class EvalResult:
    class_names: list[str]
    metrics: dict[str, float]  # bbox_mAP, bbox_mAP_50, ..., segm_mAP_l
    per_class: dict[str, list[ClassAP]]  # iou type -> one row per class, in class order
    # iou type -> COCOeval's eval["precision"] restricted to area "all", 100 detections: (T, R, K),
    # T = IoU thresholds 0.50:0.05:0.95, R = 101 recall points, K in class order; -1 where undefined
    precision: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    # the same evaluation with each class X merged with X_dry and X_susp (None when no class has variants)
    merged: EvalResult | None = None


def variant_groups(class_names: list[str]) -> dict[str, list[str]]:
    """``{X: [X, X_dry, X_susp]}`` for every class X that has at least one variant among the classes."""
    groups = {}
    for name in class_names:
        variants = [name + s for s in VARIANT_SUFFIXES if name + s in class_names]
        if variants:
            groups[name] = [name, *variants]
    return groups


def _nan_if_undefined(value: float) -> float:
    return float("nan") if value < 0 else float(value)


def _mean_defined(values: np.ndarray) -> float:
    values = values[values > -1]
    return float(values.mean()) if values.size else float("nan")


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object without detections (``COCO.loadRes`` cannot take an empty list)."""
    res = COCO()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def run_cocoeval(coco_gt: COCO, results: list[dict], iou_type: str, cat_ids: list[int], img_ids: list[int]) -> COCOeval:
    """pycocotools' evaluation of ``results`` on the given categories and images, without its printing."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.params.catIds = list(cat_ids)
        evaluator.params.imgIds = list(img_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _gt_counts(coco_gt: COCO, cat_ids: list[int], img_ids: list[int]) -> list[int]:
    ann_ids = coco_gt.getAnnIds(imgIds=img_ids, catIds=cat_ids, iscrowd=False)
    cats = [a["category_id"] for a in coco_gt.loadAnns(ann_ids) if not a.get("ignore", 0)]
    return [cats.count(c) for c in cat_ids]


def coco_evaluate(
    coco_gt: COCO, images: list[ImageResult], class_names: list[str], cat_ids: list[int], *, merge_variants: bool = True
) -> EvalResult:
    """Box and mask COCO metrics of ``images`` against ``coco_gt``.

    ``cat_ids[k]`` is the COCO category id of class ``k`` (matched by name by the dataset). Only the
    images in ``images`` are evaluated, so a subset of a split can be scored.
    """
    img_ids = [r.image_id for r in images]
    num_gt = _gt_counts(coco_gt, cat_ids, img_ids)
    # COCOeval sorts the category ids; position k of its arrays is the k-th smallest id.
    order = [sorted(cat_ids).index(c) for c in cat_ids]
    metrics, per_class, precision = {}, {}, {}
    for iou_type in IOU_TYPES:
        results = [entry for r in images for entry in r.coco_results(cat_ids, iou_type)]
        evaluator = run_cocoeval(coco_gt, results, iou_type, cat_ids, img_ids)
        for name, index in SUMMARY_STATS.items():
            metrics[f"{iou_type}_{name}"] = _nan_if_undefined(evaluator.stats[index])
        prec = evaluator.eval["precision"][:, :, order, 0, -1]  # area "all", maxDets 100
        precision[iou_type] = prec
        per_class[iou_type] = [
            ClassAP(name, num_gt[k], _mean_defined(prec[:, :, k]), _mean_defined(prec[0, :, k]), _mean_defined(prec[5, :, k]))
            for k, name in enumerate(class_names)
        ]
    result = EvalResult(list(class_names), metrics, per_class, precision)
    groups = variant_groups(class_names)
    if merge_variants and groups:
        result.merged = _evaluate_merged(coco_gt, images, class_names, cat_ids, groups)
    return result


def _evaluate_merged(
    coco_gt: COCO, images: list[ImageResult], class_names: list[str], cat_ids: list[int], groups: dict[str, list[str]]
) -> EvalResult:
    """Evaluate again with every variant relabelled as its base class (its category id remapped)."""
    base_of = {variant: base for base, members in groups.items() for variant in members}
    merged_names = [n for n in class_names if base_of.get(n, n) == n]
    id_of = dict(zip(class_names, cat_ids))
    remap = {id_of[n]: id_of[base_of.get(n, n)] for n in class_names}
    merged_ids = [id_of[n] for n in merged_names]

    dataset = coco_gt.dataset
    merged_gt = COCO()
    merged_gt.dataset = {
        "images": dataset["images"],
        "categories": [dict(c) for c in dataset["categories"] if c["id"] in merged_ids],
        "annotations": [
            {**a, "category_id": remap[a["category_id"]]} for a in dataset["annotations"] if a["category_id"] in remap
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        merged_gt.createIndex()
    label_of_id = {c: k for k, c in enumerate(merged_ids)}
    relabel = np.array([label_of_id[remap[c]] for c in cat_ids], dtype=np.int64)
    merged_images = [
        ImageResult(r.image_id, r.file_name, r.height, r.width, r.boxes, r.scores, relabel[r.labels], r.masks) for r in images
    ]
    return coco_evaluate(merged_gt, merged_images, merged_names, merged_ids, merge_variants=False)


def predict_dataset(
    model: nn.Module,
    dataset,
    *,
    device: torch.device | str,
    batch_size: int = 1,
    workers: int = 0,
    progress: bool = True,
    console: Console | None = None,
    runtime: Runtime | None = None,
) -> list[ImageResult]:
    """Run the model in eval mode over a test-mode dataset (``build_dataset(..., train=False)``).

    With a distributed ``runtime`` this rank predicts its ``distributed.shard`` of the images only (the
    results of that shard, in order; ``distributed.unshard`` joins the ranks' parts)."""
    from oilleak.data.dataset import collate

    model = getattr(model, "module", model)  # unwrap DistributedDataParallel: inference needs no gradient sync
    was_training = model.training
    model.eval()
    if runtime is not None and runtime.distributed:
        dataset = Subset(dataset, distributed.shard(len(dataset), runtime))
    pin = torch.device(device).type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate,
                        pin_memory=pin)
    results: list[ImageResult] = []
    try:
        with torch.inference_mode(), progress_bar(progress, len(dataset), "evaluating", console) as advance:
            for batch in loader:
                batch = batch.to(device)
                for meta, dets in zip(batch.metas, model(batch.images, batch.metas)):
                    results.append(ImageResult.from_detections(meta, dets))
                advance(len(batch))
    finally:
        model.train(was_training)
    return results


def evaluate_model(
    model: nn.Module, dataset, *, device: torch.device | str, batch_size: int = 1, workers: int = 0, progress: bool = True,
    console: Console | None = None,
) -> EvalResult:
    """Predict over ``dataset`` and compute its COCO metrics (the training loop's validation)."""
    images = predict_dataset(model, dataset, device=device, batch_size=batch_size, workers=workers, progress=progress,
                             console=console)
    return coco_evaluate(dataset.coco, images, list(dataset.classes), list(dataset.cat_ids))
