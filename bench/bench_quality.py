"""How well oilleak learns real photos: mask and box AP on a held-out split at fixed points of wall time.

Trains a preset from random weights on BSData (``../shared/data/bsdata/train``, 324 labelme images, one
class) split 80/20 by ``oilleak convert --val-fraction 0.2 --seed 0`` (the split is the sorted file list
shuffled by ``random.Random(0)``; 259 train / 65 val images), and evaluates the val split with oilleak's
pycocotools evaluation at ``--evals`` equally spaced points of the training wall time (evaluation time is
not counted). Writes the curve as JSON (with the machine, the command and the config) and a PNG beside it.
``bench/bench_quality_yolo.py`` does the same for the ultralytics YOLO peer on the same split.

    python bench/bench_quality.py --preset tiny --budget-s 300 --scale 512 320 --out bench_out/quality_tiny.json
    python bench/bench_quality.py --preset full --budget-s 600 --device cuda --out $OUT/quality_full.json

``--save-weights FILE`` also writes the final weights as a float16 state dict (how the demo's checkpoint
``oilleak/demo_weights/tiny_bsdata_fp16.pth`` was made, with ``--exclude`` naming the demo's own sample so
that none of its images is trained on).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from oilleak.config import Config, config_from_dict
from oilleak import distributed
from oilleak.evaluate.coco_eval import evaluate_model
from oilleak.train.stop_signals import StopSignals
from oilleak.train.loop import Trainer, TrainOptions
from oilleak.train.log import TrainLog

REPO = Path(__file__).resolve().parents[1]
BSDATA = REPO.parent / "shared" / "data" / "bsdata" / "train"
PRESETS = {"tiny": "detectors_htc_r50_tiny", "full": "detectors_htc_r50"}


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    if hasattr(os, "getloadavg"):
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def make_split(labelme: Path, root: Path, exclude: Path | None, val_fraction: float) -> Path:
    """The COCO layout of ``labelme`` split by ``oilleak convert`` (seed 0), made once and reused."""
    from oilleak.data.labelme import convert_labelme

    if (root / "annotations" / "val.json").is_file():
        return root
    source = labelme
    if exclude is not None:  # a folder of links to every labelme file not in ``exclude``
        source = root.with_name(root.name + "-source")
        shutil.rmtree(source, ignore_errors=True)
        source.mkdir(parents=True)
        skip = {p.stem for p in exclude.glob("*.json")}
        for path in labelme.iterdir():
            if path.stem not in skip:
                (source / path.name).symlink_to(path.resolve())
    convert_labelme(source, root, classes=["Pitting"], val_fraction=val_fraction, seed=0)
    return root


def build_config(args: argparse.Namespace, data_root: Path, work_dir: Path) -> Config:
    config = {
        "data": {"data_root": str(data_root), "classes": ["Pitting"], "scale": list(args.scale),
                 "batch_size": args.batch_size, "workers": args.workers},
        "model": {"preset": PRESETS[args.preset]},
        # The budget ends the run (train.time_budget_s); epochs never do. From random weights the default lr
        # schedule ("auto") is a cosine over the budget; --set train.lr_schedule=step keeps the lr constant
        # (the milestone lies past the end), as the curves of 2026-11-30 and 2026-12-06 did.
        "train": {"epochs": 1000, "milestones": [1000], "lr": args.lr, "base_batch_size": args.batch_size,
                  "warmup_iters": args.warmup, "grad_clip": args.grad_clip or None, "work_dir": str(work_dir),
                  "log_interval": 10, "seed": args.seed, "time_budget_s": args.budget_s},
    }
    return config_from_dict(config, "bench_quality", args.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--budget-s", type=float, default=300.0, help="training wall time in seconds")
    parser.add_argument("--evals", type=int, default=4, help="evaluations, equally spaced in training time")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scale", type=int, nargs=2, default=(1333, 800), metavar=("LONG", "SHORT"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01, help="lr for --batch-size images per step")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--grad-clip", type=float, default=35.0, help="0: no clipping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    parser.add_argument("--labelme", type=Path, default=BSDATA)
    parser.add_argument("--split-dir", type=Path, default=Path("/tmp/oilleak-bench-bsdata-split"))
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--exclude", type=Path, default=None, help="labelme folder whose images are left out")
    parser.add_argument("--out", type=Path, required=True, help="curve JSON; the PNG is written beside it")
    parser.add_argument("--save-weights", type=Path, default=None, help="final weights, float16 state dict")
    parser.add_argument("--score-peer", type=Path, default=None,
                        help="score bench_quality_yolo.py's RAW.json with oilleak's evaluation into --out instead")
    parser.add_argument("--plot", type=Path, nargs="*", default=None,
                        help="draw these curve JSONs into one PNG (--out) instead of training")
    args = parser.parse_args()
    if args.score_peer:
        return score_peer(args.score_peer, args.out)
    if args.plot:
        return plot_curves([json.loads(p.read_text(encoding="utf-8")) for p in args.plot], args.out)
    if args.threads:
        torch.set_num_threads(args.threads)

    data_root = make_split(args.labelme, args.split_dir, args.exclude, args.val_fraction)
    work_dir = args.out.with_suffix(".work")
    shutil.rmtree(work_dir, ignore_errors=True)
    config = build_config(args, data_root, work_dir)
    console = Console(quiet=True)
    runtime = distributed.start(args.device)
    started_on = machine()
    points = [args.budget_s * (k + 1) / args.evals for k in range(args.evals)]
    curve: list[dict] = []
    diverged, stopped_by = None, None
    with StopSignals() as signals:
        setup_start = time.perf_counter()
        trainer = Trainer(config, TrainOptions(device=args.device), runtime, console, signals)
        setup_s = time.perf_counter() - setup_start
        log = TrainLog(work_dir, enabled=True, console=console, device=runtime.device, total_steps=10**9,
                       start_step=0, log_interval=config.train.log_interval)
        with log:
            trainer.log = log
            try:
                while points and stopped_by is None:
                    trainer.batches.set_position(trainer.epoch, 0)
                    trainer.train_set.set_epoch(trainer.epoch, config.train.seed)
                    data = iter(trainer.loader)
                    for _ in range(trainer.batches.steps_per_epoch):
                        stopped_by = trainer._step(data)  # the trainer counts the training seconds
                        if trainer.trained_s >= points[0]:
                            points.pop(0)
                            curve.append(evaluate(trainer, runtime, trainer.trained_s, trainer.iteration))
                            print(json.dumps(curve[-1]), flush=True)
                            trainer.model.train()
                        if stopped_by is not None or not points:
                            break
                    trainer.epoch += 1
            except Exception as exc:  # noqa: BLE001 - a diverged run is a result: record it
                error = getattr(exc, "error", exc)  # the trainer wraps the reason
                diverged = f"{type(error).__name__} after {trainer.iteration} iterations ({trainer.trained_s:.0f} s): {error}"
                print(diverged, flush=True)
    result = {
        "tool": "oilleak", "preset": config.model.preset, "budget_s": args.budget_s, "setup_s": round(setup_s, 1),
        "device": str(runtime.device), "machine": started_on, "command": " ".join([sys.executable, *sys.argv]),
        "split": f"{args.labelme} -> oilleak convert --val-fraction {args.val_fraction} --seed 0"
                 + (f", excluding {args.exclude}" if args.exclude else ""),
        "train_images": len(trainer.train_set), "val_images": len(trainer.val_set),
        "parameters": sum(p.numel() for p in trainer.module.parameters()),
        "config": trainer.config.to_dict(), "curve": curve, "diverged": diverged,  # the norm chosen, not "auto"
        "stopped_by": stopped_by if stopped_by in ("SIGINT", "SIGTERM") else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    plot_curves([result], args.out.with_suffix(".png"))
    if args.save_weights and curve and not diverged:
        save_fp16(trainer.module, args.save_weights, result)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def evaluate(trainer: Trainer, runtime, trained_s: float, iteration: int) -> dict:
    start = time.perf_counter()
    metrics = evaluate_model(trainer.module, trainer.val_set, device=runtime.device, progress=False).metrics
    point = {"train_s": round(trained_s, 1), "iteration": iteration, "eval_s": round(time.perf_counter() - start, 1)}
    for key in ("segm_mAP", "segm_mAP_50", "bbox_mAP", "bbox_mAP_50"):
        value = metrics.get(key, float("nan"))
        point[key] = None if not math.isfinite(value) else round(value, 4)
    return point


def score_peer(raw_path: Path, out: Path) -> None:
    """The peer's predictions at each point, scored against the split's val.json by oilleak's evaluator."""
    import numpy as np
    from pycocotools.coco import COCO

    from oilleak.evaluate.coco_eval import ImageResult, coco_evaluate

    raw = json.loads(raw_path.read_text(encoding="utf-8"))
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(Path(raw["split"]) / "annotations" / "val.json"))
    cat_id = coco.getCatIds(catNms=["Pitting"])[0]
    for point in raw["curve"]:
        images = [
            ImageResult(r["image_id"], r["file_name"], r["height"], r["width"],
                        np.asarray(r["boxes"], np.float32).reshape(-1, 4), np.asarray(r["scores"], np.float32),
                        np.asarray(r["labels"], np.int64), r["masks"])
            for r in point.pop("images")
        ]
        metrics = coco_evaluate(coco, images, ["Pitting"], [cat_id]).metrics
        for key in ("segm_mAP", "segm_mAP_50", "bbox_mAP", "bbox_mAP_50"):
            point[key] = None if not math.isfinite(metrics[key]) else round(metrics[key], 4)
    out.write_text(json.dumps(raw, indent=1), encoding="utf-8")
    plot_curves([raw], out.with_suffix(".png"))
    print(json.dumps(raw["curve"]))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def save_fp16(model: torch.nn.Module, path: Path, result: dict) -> None:
    """Weights only, float16 (half the size; the demo fine-tunes in float32), with where they came from."""
    state = {k: (v.half() if v.is_floating_point() else v).cpu() for k, v in model.state_dict().items()}
    meta = {"made_by": result["command"], "split": result["split"], "preset": result["preset"],
            "train_images": result["train_images"], "iterations": result["curve"][-1]["iteration"],
            "train_s": result["curve"][-1]["train_s"], "device": result["device"],
            "val_segm_mAP": result["curve"][-1]["segm_mAP"], "val_bbox_mAP": result["curve"][-1]["bbox_mAP"],
            "scale": result["config"]["data"]["scale"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": state, "meta": {k: str(v) for k, v in meta.items()}}, tmp)
    tmp.replace(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def plot_curves(results: list[dict], path: Path) -> None:
    """Mask and box AP against training wall time, one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    for ax, key, title in zip(fig.subplots(1, 2), ("segm_mAP", "bbox_mAP"), ("mask AP", "box AP")):
        for r in results:
            xs = [p["train_s"] for p in r["curve"]]
            ys = [p[key] if p[key] is not None else float("nan") for p in r["curve"]]
            ax.plot(xs, ys, marker="o", label=f"{r['tool']} {r['preset']} ({r['device']})")
        ax.set_xlabel("training wall time (s)")
        ax.set_title(f"{title} on the BSData val split")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
