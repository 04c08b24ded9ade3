"""Two training checks for a lent GPU (they run on CPU too, with tiny settings):

    python bench/bench_gpu_train.py max-batch [--device cuda] [--time-cap 120]
    python bench/bench_gpu_train.py loss-agreement [--device cuda] [--iters 100]

``max-batch``: the largest batch that trains, in fp32 and with AMP (fp16 autocast + GradScaler, as
``oilleak train --amp``): batches 1, 2, 4, 8, ... until one runs out of GPU memory, ``--max-batch`` is
reached or ``--time-cap`` seconds have passed; each batch does two steps (forward, backward, SGD), the
second one timed, with the peak GPU memory of the pair.

``loss-agreement``: from the same start (seed 0, random weights), ``--iters`` training steps on the same two
synthetic images in each precision (strict fp32: TF32 off everywhere; fp32: PyTorch's defaults; tf32;
amp: fp16 autocast + GradScaler; bf16: bfloat16 autocast), and the loss of the last step. A precision that
changes this loss visibly is not a default.

Both use the full model (``--preset``), random weights (frozen BatchNorm statistics from the batch, as
``oilleak train`` sets them), synthetic ``--size`` images with 3 boxes / masks each, SGD (momentum 0.9,
weight decay 1e-4, gradients clipped at norm 10; lr 0 in max-batch: the same work, the weights kept; ``--lr`` in loss-agreement); data
are built once on the device (no loading: that is bench_train.py's part). One JSON line per measurement, a table at
the end, ``--json`` for a file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from oilleak.config import ModelConfig
from oilleak.train.from_scratch import calibrate_frozen_batchnorm
from oilleak.models.detector import total_loss
from oilleak.models.presets import build_model
from oilleak.structures import SEM_IGNORE, ImageMeta, Targets

PRECISIONS = {  # name: (autocast dtype or None, TF32 for matmul, TF32 for cuDNN, GradScaler)
    "strict": (None, False, False, False),
    "fp32": (None, False, True, False),
    "tf32": (None, True, True, False),
    "amp": (torch.float16, False, True, True),
    "bf16": (torch.bfloat16, False, True, False),
}


def synthetic_batch(batch: int, height: int, width: int, num_classes: int, device: torch.device):
    """``batch`` random images with 3 rectangles each (boxes, masks, semantic map), seeded."""
    generator = torch.Generator().manual_seed(0)
    pad_h, pad_w = math.ceil(height / 32) * 32, math.ceil(width / 32) * 32
    images = torch.zeros(batch, 3, pad_h, pad_w)
    images[:, :, :height, :width] = torch.randn(batch, 3, height, width, generator=generator)
    metas, targets = [], []
    for i in range(batch):
        xy = torch.rand(3, 2, generator=generator) * torch.tensor([width / 2, height / 2])
        wh = torch.rand(3, 2, generator=generator) * torch.tensor([width / 2, height / 2]) + 16
        boxes = torch.cat([xy, xy + wh], dim=1).floor()
        labels = torch.randint(0, num_classes, (3,), generator=generator)
        masks = torch.zeros(3, height, width, dtype=torch.bool)
        sem_seg = torch.full((pad_h, pad_w), SEM_IGNORE, dtype=torch.uint8)
        sem_seg[:height, :width] = 0
        for k, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
            masks[k, y1:y2, x1:x2] = True
            sem_seg[y1:y2, x1:x2] = labels[k] + 1
        targets.append(Targets(boxes, labels, masks, sem_seg).to(device))
        metas.append(ImageMeta(i, f"synthetic{i}", (height, width), (height, width), (pad_h, pad_w), (1.0, 1.0)))
    return images.to(device), metas, targets


class Trainer:
    """The model, its SGD and one training step in a precision."""

    def __init__(self, args: argparse.Namespace, device: torch.device, batch: int, precision: str, lr: float):
        torch.manual_seed(0)
        self.model = build_model(ModelConfig(preset=args.preset), args.classes).to(device)
        self.data = synthetic_batch(batch, args.size[1], args.size[0], args.classes, device)
        # random weights: the frozen BatchNorms get statistics from the batch, as `oilleak train` does
        calibrate_frozen_batchnorm(self.model, [self.data[0]])
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=0.9, weight_decay=1e-4)
        self.dtype, tf32_matmul, tf32_cudnn, scaled = PRECISIONS[precision]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_matmul, tf32_cudnn
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaled and device.type == "cuda")
        self.device = device

    def step(self) -> float:
        images, metas, targets = self.data
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
            loss = total_loss(self.model(images, metas, targets))
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        # random weights: the first gradients are huge; clipped as configs/demo.yaml trains from scratch
        torch.nn.utils.clip_grad_norm_(self.params, 10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def try_batch(args: argparse.Namespace, device: torch.device, batch: int, precision: str) -> dict:
    row = {"mode": precision, "batch": batch}
    trainer = None
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(args, device, batch, precision, lr=0.0)  # lr 0: the same work, weights kept
        trainer.step()  # warm-up
        sync(device)
        start = time.perf_counter()
        loss = trainer.step()
        sync(device)
        seconds = time.perf_counter() - start
        row.update(trains=math.isfinite(loss), seconds_per_iter=seconds, images_per_s=batch / seconds,
                   peak_gpu_memory_gb=peak_gb(device), loss=loss)
    except torch.OutOfMemoryError as exc:
        row.update(trains=False, error=f"out of memory: {str(exc).splitlines()[0][:200]}")
    except Exception as exc:  # reported in the table; the search stops there
        row.update(trains=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    del trainer
    return row


def max_batch(args: argparse.Namespace, device: torch.device) -> dict:
    start, rows, largest = time.perf_counter(), [], {}
    for precision in ("fp32", "amp"):
        batch = 1
        while batch <= args.max_batch:
            if time.perf_counter() - start > args.time_cap:
                rows.append({"mode": precision, "batch": batch, "skipped": f"time cap {args.time_cap} s reached"})
                break
            row = try_batch(args, device, batch, precision)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not row["trains"]:
                break
            largest[precision] = batch
            batch *= 2
    return {"rows": rows, "largest_batch_that_trains": largest,
            "note": "doubling search: the true limit lies between the largest batch that trained and twice it"}


def loss_agreement(args: argparse.Namespace, device: torch.device) -> dict:
    rows = []
    for precision in args.precisions:
        start, losses = time.perf_counter(), []
        try:
            trainer = Trainer(args, device, args.batch_size, precision, lr=args.lr)
            for _ in range(args.iters):
                losses.append(trainer.step())
            sync(device)
            del trainer
            row = {"mode": precision, "iters": args.iters, "first_loss": losses[0], "last_loss": losses[-1],
                   "mean_last_10": sum(losses[-10:]) / len(losses[-10:]), "seconds": time.perf_counter() - start}
        except Exception as exc:  # e.g. a NaN: reported, the other precisions still run
            row = {"mode": precision, "iters": len(losses), "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                   "losses": losses}
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = next((r["last_loss"] for r in rows if r["mode"] == "strict" and "last_loss" in r), None)
    if reference is not None:
        for row in rows:
            if "last_loss" in row:
                row["last_loss_relative_to_strict"] = row["last_loss"] / reference - 1
    return {"rows": rows, "batch": args.batch_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["max-batch", "loss-agreement"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="detectors_htc_r50")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=[1333, 800], metavar=("W", "H"))
    parser.add_argument("--time-cap", type=float, default=120.0, help="max-batch: stop doubling after this many seconds")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=100, help="loss-agreement: training steps per precision")
    parser.add_argument("--batch-size", type=int, default=2, help="loss-agreement: images per step")
    parser.add_argument("--lr", type=float, default=0.001, help="loss-agreement: SGD learning rate (random weights)")
    parser.add_argument("--precisions", nargs="+", default=["strict", "fp32", "tf32", "amp", "bf16"], choices=list(PRECISIONS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "preset": args.preset, "size": args.size,
    }
    if args.check == "max-batch":
        result.update(max_batch(args, device))
        print("\n| mode | batch | trains | s / iteration | images / s | peak GPU memory (GB) |\n|---|---:|---|---:|---:|---:|")
        for r in result["rows"]:
            if "seconds_per_iter" in r:
                peak = r["peak_gpu_memory_gb"]
                print(f"| {r['mode']} | {r['batch']} | {r['trains']} | {r['seconds_per_iter']:.3f} | {r['images_per_s']:.2f} | "
                      f"{'' if peak is None else f'{peak:.2f}'} |")
            else:
                print(f"| {r['mode']} | {r['batch']} | no | {r.get('error') or r.get('skipped')} | | |")
        print(f"largest batch that trains: {result['largest_batch_that_trains']}")
    else:
        result.update(loss_agreement(args, device))
        print(f"\n| precision | loss at step 1 | loss at step {args.iters} | vs strict fp32 | mean of last 10 | seconds |\n|---|---:|---:|---:|---:|---:|")
        for r in result["rows"]:
            if "error" in r:
                print(f"| {r['mode']} | failed after {r['iters']} steps: {r['error'][:100]} | | | | |")
                continue
            rel = r.get("last_loss_relative_to_strict")
            print(f"| {r['mode']} | {r['first_loss']:.4f} | {r['last_loss']:.4f} | {'' if rel is None else f'{rel:+.2%}'} | "
                  f"{r['mean_last_10']:.4f} | {r['seconds']:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
