"""Data-loading throughput: images per second of the training loader on BSData, for several worker counts.

    python bench/bench_data.py [--src ../shared/data/bsdata/train] [--workers 0 2 4] [--batch-size 2] [--epochs 1]

Converts the labelme folder with `oilleak convert` into a temporary folder (80 % train), then times whole
epochs of the training loader (read JPEG, decode masks, derive the semantic map, resize to 1333x800, random
flip, normalise, collate + pad), worker start-up included, as training sees it, and the CPU time they cost
(less sensitive than wall time to other load on the machine). Also times the full dataset check
(`oilleak check`, every pixel decoded). Prints a Markdown table and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from oilleak.config import DataConfig
from oilleak.data.check import check_dataset
from oilleak.data.dataset import build_dataset, collate
from oilleak.data.labelme import convert_labelme
from oilleak.train.sample_order import EpochBatches, train_loader

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the loader workers, joined after each epoch)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_epochs(data_cfg: DataConfig, workers: int, batch_size: int, epochs: int) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, images) of ``epochs`` whole epochs of the training loader."""
    dataset = build_dataset(data_cfg, "train", train=True)
    batches = EpochBatches(len(dataset), batch_size=batch_size, seed=0)
    loader = train_loader(dataset, batches, collate=collate, workers=workers, pin_memory=False)
    images = 0
    start, start_cpu = time.perf_counter(), cpu_seconds()
    for epoch in range(epochs):
        batches.set_position(epoch)
        dataset.set_epoch(epoch, 0)
        for batch in loader:
            images += len(batch)
    return time.perf_counter() - start, cpu_seconds() - start_cpu, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=REPO.parent / "shared" / "data" / "bsdata" / "train")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bsdata"
        convert_labelme(args.src, root, ["Pitting"], val_fraction=0.2, seed=0)
        data_cfg = DataConfig(data_root=str(root), classes=["Pitting"])

        start = time.perf_counter()
        report = check_dataset(data_cfg)
        check_s = time.perf_counter() - start
        if not report.ok:
            raise SystemExit(report.format())
        n_checked = sum(len(s.records) for s in report.splits.values())

        rows = []
        for workers in args.workers:
            rows.append((workers, *time_epochs(data_cfg, workers, args.batch_size, args.epochs)))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPU cores, {cpu_model()}; load average at the end {load:.1f}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads in the main process")
    print(f"data: {args.src} -> {n_checked} images (train {len(report.splits['train'].records)}), scale 1333x800, "
          f"batch size {args.batch_size}, {args.epochs} epoch(s)\n")
    print("| loader workers | images | wall s | images/s | CPU ms per image (all processes) |")
    print("|---:|---:|---:|---:|---:|")
    for workers, seconds, cpu, images in rows:
        print(f"| {workers} | {images} | {seconds:.1f} | {images / seconds:.1f} | {1000 * cpu / images:.0f} |")
    print(f"\n`check_dataset` (every pixel of {n_checked} images decoded): {check_s:.1f} s, "
          f"{n_checked / check_s:.0f} images/s")


if __name__ == "__main__":
    main()
