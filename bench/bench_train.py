"""Training speed and memory through the real training loop: seconds per iteration and peak memory.

    python bench/bench_train.py [--preset detectors_htc_r50_tiny detectors_htc_r50] [--size 1333 800]
                                [--iters 3] [--batch-size 1] [--device cpu|cuda] [--amp] [--workers 0] [--peer]

Each preset trains in a child process of its own (so its peak memory is its own) on one epoch of synthetic
images of the given size, each with the mmdetection CPU peer's ground truth (3 boxes / masks of classes 0,
3, 5 of 6, a semantic map derived from them), random weights, the 1x schedule's SGD, through
`run_training`: data loading (reported apart too), forward, backward, step, logging. The first iteration
(warm-up) is left out of the median.
Peak memory is the child's peak RSS on CPU and torch's peak allocated memory on CUDA.
`--peer` also runs mmdetection 3.3's own training step on the same input size with the peer venv of
../shared/peers/mmdet (`setup_cpu.sh /tmp/mmdet_peer`), when that venv exists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PEER_PYTHON = Path("/tmp/mmdet_peer/bin/python")
PEER_SCRIPT = REPO.parent / "shared" / "peers" / "mmdet" / "bench" / "mmdet_cpu_train_iter.py"
CLASSES = [f"class_{k}" for k in range(6)]
# the peer script's ground truth: (x1, y1, x2, y2), label
GROUND_TRUTH = [((100, 120, 400, 500), 0), ((600, 200, 900, 700), 3), ((50, 50, 90, 80), 5)]


def make_image_dataset(root: Path, width: int, height: int, count: int) -> None:
    """``count`` random images, each with the peer's ground truth (drawn for 1333x800; scaled to other sizes)."""
    (root / "train").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "train" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
        for box, label in GROUND_TRUTH:
            x1, x2 = (round(v * width / 1333) for v in box[::2])
            y1, y2 = (round(v * height / 800) for v in box[1::2])
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1, "iscrowd": 0,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
            })
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}
    (root / "annotations" / "train.json").write_text(json.dumps(coco))


def child(args: argparse.Namespace) -> None:
    """One preset's run; prints one JSON line with the measurements."""
    from rich.console import Console

    from oilleak.config import config_from_dict
    from oilleak.train.loop import TrainOptions, run_training

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        width, height = args.size
        # one epoch holds every iteration: loader workers start once, as in a real epoch
        make_image_dataset(root, width, height, args.batch_size * (args.iters + 1))
        cfg = config_from_dict({
            "data": {"data_root": str(root), "classes": CLASSES, "scale": [max(args.size), min(args.size)],
                     "flip_prob": 0.0, "batch_size": args.batch_size, "workers": args.workers,
                     "train": {"ann_file": "annotations/train.json", "img_dir": "train"},
                     "val": {"ann_file": "annotations/none.json", "img_dir": "train"}},  # no evaluation
            "model": {"preset": args.preset},
            "train": {"work_dir": str(Path(tmp) / "work"), "lr": 0.001, "log_interval": 1, "epochs": 1000,
                      "milestones": [999]},
        })
        with open(os.devnull, "w") as sink:
            run_training(cfg, TrainOptions(max_iters=args.iters + 1, device=args.device, amp=args.amp),
                         Console(file=sink))
        steps = [json.loads(line) for line in (Path(tmp) / "work" / "log.jsonl").read_text().splitlines()]
    train = [s for s in steps if s["type"] == "train"][1:]
    times = [s["time"] for s in train]
    print(json.dumps({"preset": args.preset, "seconds_per_iter": statistics.median(times), "times": times,
                      "data_seconds_per_iter": statistics.median(s["data_time"] for s in train),
                      "peak_memory_gb": max(s["memory_mb"] for s in steps) / 1024}))


def run_child(args: argparse.Namespace, preset: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", preset, "--size", *map(str, args.size),
           "--iters", str(args.iters), "--batch-size", str(args.batch_size), "--device", args.device, "--workers", str(args.workers)]
    cmd += ["--amp"] if args.amp else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{preset} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_peer(args: argparse.Namespace) -> dict | None:
    if not (PEER_PYTHON.exists() and PEER_SCRIPT.exists()):
        print(f"(peer skipped: {PEER_PYTHON} not found; bash ../shared/peers/mmdet/setup_cpu.sh /tmp/mmdet_peer)")
        return None
    width, height = args.size
    cmd = ["/usr/bin/time", "-f", "maxrss_kb %M", str(PEER_PYTHON), str(PEER_SCRIPT), str(height), str(width),
           str(args.iters)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    median = next((float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("median_s")), None)
    rss = next((int(line.split()[1]) for line in out.stderr.splitlines() if line.startswith("maxrss_kb")), None)
    if median is None:
        print(f"(peer failed: {out.stderr[-1500:]})")
        return None
    return {"preset": "mmdet 3.3 detectors_htc-r50 (peer)", "seconds_per_iter": median,
            "peak_memory_gb": rss / 2**20 if rss else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", default=["detectors_htc_r50_tiny", "detectors_htc_r50"])
    parser.add_argument("--size", type=int, nargs=2, default=[1333, 800], metavar=("W", "H"))
    parser.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--workers", type=int, default=0, help="data loader processes (0: load in the training loop)")
    parser.add_argument("--peer", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.preset = args.preset[0]
        return child(args)

    import torch

    rows = [run_child(args, preset) for preset in args.preset]
    peer = run_peer(args) if args.peer else None
    rows += [peer] if peer else []
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    print(f"machine: {platform.node()}, {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"input {args.size[0]}x{args.size[1]}, batch {args.batch_size}, {args.iters} timed iterations, "
          f"device {args.device}{' AMP' if args.amp else ''}, {args.workers} loader workers\n")
    print("| model | s / iteration | of which data loading (s) | images / s | peak memory (GB) |\n|---|---|---|---|---|")
    for row in rows:
        data = row.get("data_seconds_per_iter")
        print(f"| {row['preset']} | {row['seconds_per_iter']:.3f} | {'' if data is None else f'{data:.3f}'} | "
              f"{args.batch_size / row['seconds_per_iter']:.2f} | {row['peak_memory_gb']:.2f} |")


if __name__ == "__main__":
    main()
