"""`oilleak test --out FILE.pkl`: mmdetection 3.3's result pickle, as its ``tools/test.py --out`` writes it.

mmdetection's ``DumpDetResults`` metric receives each test image's data sample as ``DetDataSample.to_dict()``,
drops the ground truth (``gt_instances``, ``ignored_instances``, ``gt_panoptic_seg``), encodes the masks as
RLE with ``encode_mask_results`` and dumps the list with ``mmengine.dump`` (pickle protocol 2). The file is a
list, in the dataset's image order (the annotation file's), of one dict per image::

    img_id             int, the image's id in the annotation file
    img_path           str, the image file (data_root joined with the split's image folder and file_name)
    ori_shape          (h, w) ints, the image as stored
    img_shape          (h, w) ints, after the test resize (keep ratio to fit data.scale), before padding
    scale_factor       (w, h) floats, img_shape / ori_shape as mmdetection's Resize gives them
    pad_shape          (h, w) ints, img_shape padded up to a multiple of 32
    batch_input_shape  (h, w) ints, the batch tensor's size: pad_shape (one image per batch, as mmdet tests)
    pred_instances     dict:
        bboxes  torch.float32 (n, 4), x1 y1 x2 y2 in original image pixels
        scores  torch.float32 (n,)
        labels  torch.int64 (n,), 0-based in the config's class order (mmdet's label = index in metainfo classes)
        masks   list of n COCO RLEs {"size": [h, w], "counts": bytes} (pycocotools.mask.encode's own output)

so mmdetection's tools read it as they read their own: ``tools/analysis_tools/eval_metric.py`` (CocoMetric's
``offline_evaluate``) and ``confusion_matrix.py`` (bench/mmdet_tools_check.py runs both on it, and finds it
equal to what DumpDetResults writes for the same predictions). Loading it needs torch (the tensors).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from oilleak.data.transforms import padded_size, rescale_size
from oilleak.evaluate.coco_eval import ImageResult
from oilleak.files import atomic_write

SUFFIXES = (".pkl", ".pickle")  # DumpDetResults refuses other names
PROTOCOL = 2  # mmengine.dump's default for pickle files


def mmdet_sample(image: ImageResult, img_path: str | Path, scale: Sequence[int]) -> dict:
    """One image's entry of the pickle: the meta mmdetection's test pipeline records, and its predictions."""
    height, width = int(image.height), int(image.width)
    new_w, new_h = rescale_size(width, height, tuple(scale))
    pad = tuple(int(v) for v in padded_size(new_h, new_w))
    masks = [{"size": [int(s) for s in rle["size"]],
              "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else bytes(rle["counts"])}
             for rle in image.masks]
    return {
        "img_id": int(image.image_id),
        "img_path": str(img_path),
        "ori_shape": (height, width),
        "img_shape": (new_h, new_w),
        "scale_factor": (new_w / width, new_h / height),
        "batch_input_shape": pad,
        "pad_shape": pad,
        "pred_instances": {
            "bboxes": torch.from_numpy(np.array(image.boxes, np.float32).reshape(-1, 4)),
            "scores": torch.from_numpy(np.array(image.scores, np.float32).reshape(-1)),
            "labels": torch.from_numpy(np.array(image.labels, np.int64).reshape(-1)),
            "masks": masks,
        },
    }


def mmdet_samples(images: Sequence[ImageResult], paths: Mapping[int, str | Path], scale: Sequence[int]) -> list[dict]:
    """The pickle's list: ``paths`` maps image ids to their files, ``scale`` is the test resize (data.scale)."""
    return [mmdet_sample(image, paths[image.image_id], scale) for image in images]


def write_mmdet_results(out: Path, images: Sequence[ImageResult], dataset) -> None:
    """Write ``images`` (in ``dataset``'s order) as mmdetection 3.3's result pickle; ``dataset`` is the
    test-mode :class:`~oilleak.data.dataset.CocoDataset` they were predicted on (its files and scale)."""
    paths = {record.image_id: record.path for record in dataset.records}
    samples = mmdet_samples(images, paths, dataset.scale)
    with atomic_write(out) as f:
        pickle.dump(samples, f, protocol=PROTOCOL)
