"""How fast the tiny DetectoRS learns from random weights: the learning test's setting, with knobs.

Trains `detectors_htc_r50_tiny` on synthetic shapes (tests/test_train_loop.make_shapes: noise with 1-3
filled boxes / discs per image, evaluated on the same images) and prints the mask mAP curve from the run's
log.jsonl. Used to choose the learning test's size, lr and length and to see how much they depend on the
seed and the thread count.

    python bench/bench_learning.py --size 128 --lr 0.01 --iters 120 --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_train_loop import make_shapes, shapes_config  # noqa: E402

from oilleak.train.loop import TrainOptions, run_training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=120)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seeds the shapes and the training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--evals", type=int, default=4, help="evaluations over the run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="oilleak-learning-"))
    try:
        data = make_shapes(root / "shapes", images=args.images, size=args.size, seed=args.seed)
        epochs = args.iters // max(1, args.images // args.batch_size)
        config = shapes_config(data, root / "work", size=args.size, data={"batch_size": args.batch_size}, train={
            "lr": args.lr, "warmup_iters": args.warmup, "grad_clip": 10.0, "epochs": epochs,
            "milestones": [int(epochs * 0.8)], "eval_interval": max(1, epochs // args.evals), "log_interval": 10,
            "seed": args.seed,
        })
        start = time.perf_counter()
        result = run_training(config, TrainOptions(device="cpu"), Console(quiet=True))
        seconds = time.perf_counter() - start
        records = [json.loads(line) for line in (root / "work" / "log.jsonl").read_text().splitlines()]
        curve = [(r["iter"], round(r["segm_mAP"], 3)) for r in records if r.get("type") == "val"]
        print(f"{vars(args)}: {result.iterations} iterations in {seconds:.0f} s; mask mAP by iteration {curve}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
