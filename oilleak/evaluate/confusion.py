"""A confusion matrix of instances matched by mask IoU, background included.

Per image, the predictions at or above the score threshold are taken in descending score order; each is
matched to the not yet matched ground-truth instance of ANY class with which its mask IoU is highest, if
that IoU is at least ``iou_thr``. Matching ignores the class, so a "dry" stain predicted as "suspected"
shows up off the diagonal instead of as one miss plus one false alarm.

``matrix[g, p]``: ground truth of class g predicted as class p. The last row (background) counts
predictions that matched nothing (false alarms); the last column (background) counts ground truth that no
prediction matched (misses). Predictions on ``iscrowd`` regions are not counted.
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from oilleak.evaluate.coco_eval import ImageResult

MATCH_IOU = 0.5  # the default iou_thr: what `oilleak test` draws and reports


def confusion_matrix(
    coco_gt: COCO, images: list[ImageResult], cat_ids: list[int], score_thr: float, iou_thr: float = MATCH_IOU
) -> np.ndarray:
    k = len(cat_ids)
    background = k
    label_of = {c: i for i, c in enumerate(cat_ids)}
    matrix = np.zeros((k + 1, k + 1), np.int64)
    for image in images:
        anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[image.image_id], catIds=cat_ids))
        gt = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = [coco_gt.annToRLE(a) for a in anns if a.get("iscrowd", 0)]
        gt_rles = [coco_gt.annToRLE(a) for a in gt]
        gt_labels = [label_of[a["category_id"]] for a in gt]

        keep = [i for i in np.argsort(-image.scores, kind="stable") if image.scores[i] >= score_thr]
        dt_rles = [image.masks[i] for i in keep]
        if crowd and dt_rles:  # with iscrowd set, pycocotools gives intersection over the prediction's area
            on_crowd = mask_util.iou(dt_rles, crowd, [1] * len(crowd)).max(1) >= iou_thr
            keep = [i for i, c in zip(keep, on_crowd) if not c]
            dt_rles = [image.masks[i] for i in keep]
        ious = mask_util.iou(dt_rles, gt_rles, [0] * len(gt_rles)) if dt_rles and gt_rles else np.zeros((len(keep), len(gt)))
        ious = np.asarray(ious).reshape(len(keep), len(gt))

        matched = np.zeros(len(gt), bool)
        for row, i in enumerate(keep):
            candidates = np.where(matched, -1.0, ious[row])
            best = int(candidates.argmax()) if len(gt) else -1
            predicted = int(image.labels[i])
            if best >= 0 and candidates[best] >= iou_thr:
                matched[best] = True
                matrix[gt_labels[best], predicted] += 1
            else:
                matrix[background, predicted] += 1
        for j in np.flatnonzero(~matched):
            matrix[gt_labels[j], background] += 1
    return matrix
