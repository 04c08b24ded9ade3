"""Which from-scratch recipe learns BSData best: the same number of iterations for every variant, then mask
and box AP on the held-out split.

The tiny preset from random weights on bench_quality.py's 80/20 split of BSData (``oilleak convert
--val-fraction 0.2 --seed 0``, 259 train / 65 val images), evaluated with its pycocotools evaluation. Every
variant trains ``--iters`` iterations (iteration-matched, so the result does not depend on the machine's load)
with the same seed, lr and clipping; only its recipe changes:

  a  frozen BatchNorm, statistics measured on 10 batches (the default without weights)
  b  trained BatchNorm (train.backbone_norm: batch)
  c  GroupNorm in the backbones and the mask / semantic heads (model.norm: group)
  d  the best of a-c (mask AP, then box AP, then the lower loss of the last 10 iterations; or --base) + multi-scale
  e  d + photometric distortion
  f  e + twice the warm-up

Multi-scale draws one of nine scales from 0.75x to 1.25x of ``--scale`` (both sides): with BSData's 1130x460
photos the long side is what limits the resize, so mmdetection's "long 1333, short 480..800" would leave them
within 8 % of one size. Writes one JSON with every variant's settings, losses, AP and seconds.

    python bench/bench_recipe.py --iters 40 --scale 512 320 --threads 1 --out bench_out/recipe.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from bench_quality import BSDATA, build_config, evaluate, machine, make_split  # bench/ is the script's folder: on sys.path
from oilleak import distributed
from oilleak.train.log import TrainLog
from oilleak.train.loop import Trainer, TrainOptions
from oilleak.train.stop_signals import StopSignals

BASE = {"a": ["train.backbone_norm=frozen"], "b": ["train.backbone_norm=batch"], "c": ["model.norm=group"]}
MULTI_SCALE_RATIOS = [0.75 + 0.0625 * k for k in range(9)]


def run_variant(name: str, overrides: list[str], args: argparse.Namespace, data_root: Path) -> dict:
    """Train one variant for ``args.iters`` iterations and evaluate it; a NaN stop is a result too."""
    work_dir = args.out.with_suffix(f".{name}.work")
    shutil.rmtree(work_dir, ignore_errors=True)
    config = build_config(argparse.Namespace(**{**vars(args), "set": [*args.set, *overrides]}), data_root, work_dir)
    runtime = distributed.start("cpu")
    console = Console(quiet=True)
    start = time.perf_counter()
    diverged, point = None, None
    with StopSignals() as signals:
        trainer = Trainer(config, TrainOptions(device="cpu"), runtime, console, signals)
        setup_s = time.perf_counter() - start
        log = TrainLog(work_dir, enabled=True, console=console, device=runtime.device, total_steps=args.iters,
                       start_step=0, log_interval=10)
        with log:
            trainer.log = log
            try:
                while trainer.iteration < args.iters:
                    trainer.batches.set_position(trainer.epoch, 0)
                    trainer.train_set.set_epoch(trainer.epoch, config.train.seed)
                    data = iter(trainer.loader)
                    for _ in range(min(trainer.batches.steps_per_epoch, args.iters - trainer.iteration)):
                        trainer._step(data)
                    trainer.epoch += 1
            except Exception as exc:  # noqa: BLE001 - a diverged run is a result: record it
                error = getattr(exc, "error", exc)  # the trainer wraps the reason
                diverged = f"{type(error).__name__} after {trainer.iteration} iterations: {error}"
        train_s = time.perf_counter() - start - setup_s
        if diverged is None:
            point = evaluate(trainer, runtime, train_s, trainer.iteration)
    windows = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    losses = [r for r in windows if r["type"] == "train"]
    result = {
        "variant": name, "overrides": overrides, "iterations": trainer.iteration, "diverged": diverged,
        "loss_first": round(losses[0]["loss"], 4) if losses else None,
        "loss_last10": round(losses[-1]["loss"], 4) if losses else None,  # mean of the last window of 10
        "setup_s": round(setup_s, 1), "train_s": round(train_s, 1), "s_per_iter": round(train_s / max(trainer.iteration, 1), 2),
        **(point or {}), "config": config.to_dict(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "config"}), flush=True)
    return result


def rank(result: dict) -> tuple:
    """Higher is better: mask AP, box AP, then the lower final loss; a diverged run is last."""
    if result["diverged"]:
        return (-1.0, -1.0, float("-inf"))
    return (result.get("segm_mAP") or 0.0, result.get("bbox_mAP") or 0.0, -result["loss_last10"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40, help="training iterations of every variant")
    parser.add_argument("--variants", default="abcdef", help="which of a-f to run")
    parser.add_argument("--base", choices=list("abc"), default=None,
                        help="what d-f build on (default: the best of the a-c run in this call)")
    parser.add_argument("--scale", type=int, nargs=2, default=(512, 320), metavar=("LONG", "SHORT"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.005, help="configs/bsdata.yaml's lr for a batch of 2")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up iterations (f: twice as many)")
    parser.add_argument("--grad-clip", type=float, default=35.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--set", action="append", default=[], help="config override for every variant")
    parser.add_argument("--labelme", type=Path, default=BSDATA)
    parser.add_argument("--split-dir", type=Path, default=Path("/tmp/oilleak-bench-bsdata-split"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # what bench_quality.build_config reads besides the above
    args.preset, args.workers = "tiny", 0
    if args.threads:
        torch.set_num_threads(args.threads)

    data_root = make_split(args.labelme, args.split_dir, None, 0.2)
    report = {
        "machine": machine(), "command": " ".join([sys.executable, *sys.argv]), "iterations": args.iters,
        "scale": list(args.scale), "split": f"{args.labelme} -> oilleak convert --val-fraction 0.2 --seed 0",
        "results": [],
    }
    results = report["results"]

    def record(result: dict) -> None:  # written after every variant, so a stopped run keeps what it measured
        results.append(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")

    for name in "abc":
        if name in args.variants:
            record(run_variant(name, BASE[name], args, data_root))
    if set("def") & set(args.variants):
        base = BASE[args.base] if args.base else max(results, key=rank)["overrides"]
        long_side, short_side = args.scale
        scales = [[round(long_side * r), round(short_side * r)] for r in MULTI_SCALE_RATIOS]
        overrides = [*base, f"data.multi_scale={json.dumps(scales)}"]
        steps = {"d": [], "e": ["data.photometric=true"], "f": [f"train.warmup_iters={2 * args.warmup}"]}
        for name in "def":
            overrides = overrides + steps[name]
            if name in args.variants:
                record(run_variant(name, overrides, args, data_root))
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
