"""Proof that training trains: the tiny DetectoRS, from random weights on CPU with the default recipe
(GroupNorm, the lr on a cosine: ``model.norm`` and ``train.lr_schedule`` "auto"), learns to outline the shapes
of four synthetic images and reaches mask mAP >= 0.3 on them (an untrained model scores 0), measured here with
pycocotools directly.

80 iterations of batch 2 at 128x128 with lr 0.02 on one CPU thread, one checkpoint at the end: about 1.5 minutes
on a quiet Sapphire Rapids core. Measured there (2026-12-08), by the CPU kernels PyTorch picks: 0.613 with its
own choice (AVX-512), 0.635 with AVX2 only (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) and 0.408 with
no SIMD at all (``ATEN_CPU_CAPABILITY=default``, the lowest, whence the threshold); 100 iterations gave 0.600,
60 at lr 0.03 0.395, 50 of batch 4 0.280. The earlier 200 iterations at lr 0.01 (0.76-0.83) took 15 minutes on one
thread of a 2-core AVX2 EPYC, a third of the suite (issue 29). At 96x96 the smallest shapes sit below the
32 px anchors and the mAP varied with the thread count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from oilleak.data.dataset import build_dataset, collate
from oilleak.train.loop import TrainOptions, run_training
from test_train_loop import make_shapes, quiet, shapes_config

ITERATIONS = 80  # 4 images / batch 2 = 2 steps per epoch: 40 epochs
SIZE = 128  # shapes of 20-50 px: most overlap a 32 px anchor at IoU >= 0.3


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


@pytest.fixture
def one_thread():
    """Float32 sums follow the thread count and training amplifies them: pin it for a repeatable run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_tiny_detectors_learns_the_shapes_it_sees(tmp_path, one_thread):
    data = make_shapes(tmp_path / "shapes", images=4, size=SIZE, seed=0)
    epochs = ITERATIONS // 2
    config = shapes_config(data, tmp_path / "work", size=SIZE, data={"batch_size": 2}, train={
        "lr": 0.02, "warmup_iters": 10, "grad_clip": 10.0, "epochs": epochs,
        "eval_interval": epochs, "checkpoint_interval": epochs, "log_interval": 10,
    })
    result = run_training(config, TrainOptions(device="cpu"), quiet())
    assert result.iterations == ITERATIONS and result.stopped_by is None
    mask_map = coco_mask_map(result.model, config)
    print(f"mask mAP on the training images after {ITERATIONS} iterations: {mask_map:.3f}")
    assert mask_map >= 0.3
    assert result.best == pytest.approx(mask_map, abs=1e-6)  # the training's own evaluation agrees
    assert (tmp_path / "work" / "best.pth").is_file() and (tmp_path / "work" / "loss_curve.png").is_file()
