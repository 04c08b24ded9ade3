"""Seconds per training step and per prediction of the tiny presets on CPU (what tests and CPU experiments use).

A train step is forward in loss mode, backward and an SGD step on a batch of synthetic images with three
rectangular objects each; predict is ``model.eval()(images, metas)`` with the default test settings.

Usage: python bench/bench_tiny_step.py [--size 256] [--batch 1] [--iters 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from oilleak.config import ModelConfig
from oilleak.models.detector import total_loss
from oilleak.models.presets import build_model
from oilleak.structures import SEM_IGNORE, ImageMeta, Targets


def synthetic_batch(size: int, batch: int, num_classes: int, generator: torch.Generator):
    pad = math.ceil(size / 32) * 32
    images = torch.zeros(batch, 3, pad, pad)
    images[:, :, :size, :size] = torch.randn(batch, 3, size, size, generator=generator)
    metas, targets = [], []
    for i in range(batch):
        xy = torch.randint(0, size // 2, (3, 2), generator=generator)
        wh = torch.randint(16, size // 2, (3, 2), generator=generator)
        boxes = torch.cat([xy, xy + wh], dim=1).float()
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        sem_seg = torch.full((pad, pad), SEM_IGNORE, dtype=torch.uint8)
        sem_seg[:size, :size] = 0
        labels = torch.randint(0, num_classes, (3,), generator=generator)
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = True
            sem_seg[y1:y2, x1:x2] = labels[k] + 1
        targets.append(Targets(boxes, labels, masks, sem_seg))
        metas.append(ImageMeta(i, f"synthetic{i}", (size, size), (size, size), (pad, pad), (1.0, 1.0)))
    return images, metas, targets


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, metas, targets = synthetic_batch(args.size, args.batch, 6, torch.Generator().manual_seed(0))
    print(f"{args.batch} x {args.size}x{args.size}, {args.threads} thread(s), torch {torch.__version__}")
    for preset in ("htc_r50_tiny", "detectors_htc_r50_tiny"):
        model = build_model(ModelConfig(preset=preset), 6)
        # lr 0: the same work as a real step, and the timed steps all see the same weights (speed only)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)

        def train_step():
            model.train()
            optimizer.zero_grad()
            total_loss(model(images, metas, targets)).backward()
            optimizer.step()

        def predict():
            model.eval()
            model(images, metas)

        print(f"{preset:24s} train step {timed(train_step, args.iters):6.2f} s   predict {timed(predict, args.iters):6.2f} s")


if __name__ == "__main__":
    main()
