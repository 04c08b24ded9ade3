"""Proof that training trains: the tiny DetectoRS, from random weights on CPU, learns to outline the shapes of
four synthetic images and reaches mask mAP >= 0.5 on them, measured here with pycocotools directly.

About 120 iterations of batch 2 at 96x96: 4-5 minutes on 2 shared cores (BENCHMARKS.md, Training, has the
curve). Without the BatchNorm statistics set before the first step (engine/from_scratch.py) an 8-image run
of the same kind stayed near mAP 0 for its first 100 iterations (BENCHMARKS.md).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from oilleak.data.dataset import build_dataset, collate
from oilleak.engine.train import TrainOptions, run_training
from test_train_loop import make_shapes, quiet, shapes_config

ITERATIONS = 120  # 4 images / batch 2 = 2 steps per epoch: 60 epochs


def coco_mask_map(model, config) -> float:
    """COCO mask AP of ``model`` on the validation split, straight from pycocotools."""
    dataset = build_dataset(config.data, "val", train=False)
    gt: COCO = dataset.coco
    results = []
    model.eval()
    with torch.no_grad():
        for index in range(len(dataset)):
            batch = collate([dataset[index]])
            (dets,) = model(batch.images, batch.metas)
            for mask, label, score in zip(dets.masks.numpy(), dets.labels.tolist(), dets.scores.tolist()):
                rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
                rle["counts"] = rle["counts"].decode()
                results.append({"image_id": batch.metas[0].image_id, "category_id": dataset.cat_ids[label],
                                "segmentation": rle, "score": score})
    assert results, "the trained model detects nothing"
    evaluation = COCOeval(gt, gt.loadRes(results), "segm")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return float(evaluation.stats[0])


@pytest.mark.slow
def test_tiny_detectors_learns_the_shapes_it_sees(tmp_path):
    data = make_shapes(tmp_path / "shapes", images=4, size=96, seed=0)
    epochs = ITERATIONS // 2
    config = shapes_config(data, tmp_path / "work", data={"batch_size": 2}, train={
        "lr": 0.02, "warmup_iters": 20, "grad_clip": 10.0, "epochs": epochs, "milestones": [int(epochs * 0.8)],
        "eval_interval": epochs, "log_interval": 10,
    })
    result = run_training(config, TrainOptions(device="cpu"), quiet())
    assert result.iterations == ITERATIONS and result.stopped_by is None
    mask_map = coco_mask_map(result.model, config)
    print(f"mask mAP on the training images after {ITERATIONS} iterations: {mask_map:.3f}")
    assert mask_map >= 0.5
    assert result.best == pytest.approx(mask_map, abs=1e-6)  # the training's own evaluation agrees
    assert (tmp_path / "work" / "best.pth").is_file() and (tmp_path / "work" / "loss_curve.png").is_file()
