"""The peer of bench_quality.py: ultralytics YOLO-seg trained from scratch on the same BSData split and budget.

Runs in the peer's own environment (``bash bench/setup_yolo_peer.sh`` makes ``bench/.yolo-venv``; oilleak
is never imported here, ultralytics never by oilleak). It reads the COCO split that ``bench_quality.py``
made (``--split-dir``, default the same), writes it as a YOLO dataset (one polygon per instance, class 0),
trains ``yolo11n-seg.yaml`` (random weights, nothing downloaded) for ``--budget-s`` seconds of training
wall time, keeps a copy of the EMA model (what ultralytics evaluates and saves) at ``--evals`` equally spaced
points of that time, and after training predicts the val images with each copy. The predictions (boxes,
scores, masks as COCO RLE at the original image size) go to ``OUT.raw.json``; oilleak's pycocotools
evaluation scores them, so both tools are measured by one evaluator:

    bench/.yolo-venv/bin/python bench/bench_quality_yolo.py --model yolo11n-seg.yaml --budget-s 300 \\
        --imgsz 512 --out bench_out/quality_yolo11n.json
    python bench/bench_quality.py --score-peer bench_out/quality_yolo11n.raw.json --out bench_out/quality_yolo11n.json

Training is fp32 (``amp=False``, as oilleak's bench), ultralytics' own validation is off (``val=False``) so
the budget is spent on training, and ``time=`` lets ultralytics fit its lr schedule to the budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_util


def write_yolo_dataset(split_dir: Path, out: Path) -> Path:
    """``out/images/{train,val}`` (links to the split's images), ``out/labels/{train,val}/*.txt`` and data.yaml."""
    for split in ("train", "val"):
        coco = json.loads((split_dir / "annotations" / f"{split}.json").read_text(encoding="utf-8"))
        images, labels = out / "images" / split, out / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        lines: dict[int, list[str]] = {img["id"]: [] for img in coco["images"]}
        size = {img["id"]: (img["width"], img["height"]) for img in coco["images"]}
        for ann in coco["annotations"]:
            w, h = size[ann["image_id"]]
            polygon = max(ann["segmentation"], key=len)  # one polygon per instance in this data
            xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2) / (w, h)
            lines[ann["image_id"]].append("0 " + " ".join(f"{v:.6f}" for v in xy.clip(0, 1).ravel()))
        for img in coco["images"]:
            link = images / img["file_name"]
            if not link.exists():
                link.symlink_to((split_dir / split / img["file_name"]).resolve())
            (labels / (Path(img["file_name"]).stem + ".txt")).write_text("\n".join(lines[img["id"]]) + "\n")
    data_yaml = out / "data.yaml"
    data_yaml.write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n  0: Pitting\n")
    return data_yaml


def predict_val(model: torch.nn.Module, model_yaml: str, split_dir: Path, imgsz: int, device: str) -> list[dict]:
    """Predictions of one EMA copy on the val images, as oilleak's ImageResult fields."""
    from ultralytics import YOLO

    coco = json.loads((split_dir / "annotations" / "val.json").read_text(encoding="utf-8"))
    yolo = YOLO(model_yaml, task="segment")
    yolo.model = model.float().eval()
    out = []
    for img in coco["images"]:
        r = yolo.predict(str(split_dir / "val" / img["file_name"]), imgsz=imgsz, conf=0.001, iou=0.7, max_det=100,
                         retina_masks=True, device=device, verbose=False)[0]
        n = 0 if r.masks is None else len(r.boxes)
        masks = r.masks.data.cpu().numpy().astype(np.uint8) if n else np.zeros((0, img["height"], img["width"]), np.uint8)
        rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if n else []
        out.append({
            "image_id": img["id"], "file_name": img["file_name"], "height": img["height"], "width": img["width"],
            "boxes": r.boxes.xyxy.cpu().numpy().tolist() if n else [],
            "scores": r.boxes.conf.cpu().numpy().tolist() if n else [],
            "labels": r.boxes.cls.cpu().numpy().astype(int).tolist() if n else [],
            "masks": [{"size": m["size"], "counts": m["counts"].decode("ascii")} for m in rles],
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="yolo11n-seg.yaml", help="an ultralytics model yaml (random weights)")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--evals", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="ultralytics' seed (weights, shuffling, augmentation)")
    parser.add_argument("--split-dir", type=Path, default=Path("/tmp/oilleak-bench-bsdata-split"))
    parser.add_argument("--out", type=Path, required=True, help="the curve's JSON (scored by bench_quality.py)")
    args = parser.parse_args()
    if not (args.split_dir / "annotations" / "val.json").is_file():
        sys.exit(f"{args.split_dir} holds no COCO split: run bench/bench_quality.py (it makes the split) first")
    from ultralytics import YOLO

    device = "0" if args.device == "cuda" else args.device.replace("cuda:", "")  # ultralytics' device names
    work = args.out.with_suffix(".yolo")
    data_yaml = write_yolo_dataset(args.split_dir, work / "dataset")
    points = [args.budget_s * (k + 1) / args.evals for k in range(args.evals)]
    snapshots: list[tuple[float, int, torch.nn.Module]] = []
    clock = {"start": None, "paused": 0.0, "iters": 0}

    def on_train_start(trainer) -> None:
        clock["start"] = time.perf_counter()

    def on_batch_end(trainer) -> None:
        clock["iters"] += 1
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        trained = time.perf_counter() - clock["start"] - clock["paused"]
        if points and trained >= points[0]:
            pause = time.perf_counter()
            points.pop(0)
            snapshots.append((trained, clock["iters"], copy.deepcopy(trainer.ema.ema).cpu()))
            print(json.dumps({"train_s": round(trained, 1), "iteration": clock["iters"]}), flush=True)
            clock["paused"] += time.perf_counter() - pause
            if not points:
                trainer.stop = True
                trainer.args.time = 1e-9  # ultralytics leaves the batch loop when its time is up

    def without_polars(trainer) -> None:
        # the metrics ultralytics stores in its checkpoints are read back with polars, which the GPU image
        # lacks (and whose 40 MB wheel is not carried); nothing here needs them
        trainer.read_results_csv = lambda: {}

    model = YOLO(args.model, task="segment")
    model.add_callback("on_pretrain_routine_start", without_polars)
    model.add_callback("on_train_start", on_train_start)
    model.add_callback("on_train_batch_end", on_batch_end)
    start = time.perf_counter()
    model.train(data=str(data_yaml), epochs=1000, time=args.budget_s * 1.05 / 3600, imgsz=args.imgsz,
                batch=args.batch_size, device=device, workers=args.workers, val=False, plots=False, amp=False,
                pretrained=False, project=str(work), name="train", exist_ok=True, seed=args.seed, verbose=False)
    setup_s = time.perf_counter() - start
    if points and clock["start"] is not None:  # ultralytics stopped a little early: the final model is the last point
        trained = time.perf_counter() - clock["start"] - clock["paused"]
        snapshots.append((trained, clock["iters"], copy.deepcopy(model.trainer.ema.ema).cpu()))
    curve = []
    for trained, iters, snapshot in snapshots:
        t = time.perf_counter()
        images = predict_val(snapshot, args.model, args.split_dir, args.imgsz, device)
        curve.append({"train_s": round(trained, 1), "iteration": iters, "eval_s": round(time.perf_counter() - t, 1),
                      "images": images})
    import ultralytics

    raw = {
        "tool": f"ultralytics {ultralytics.__version__}", "preset": Path(args.model).stem, "budget_s": args.budget_s,
        "device": args.device, "setup_s": round(setup_s, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "load_avg_at_start": list(os.getloadavg())},
        "command": " ".join([sys.executable, *sys.argv]),
        "config": {"imgsz": args.imgsz, "batch": args.batch_size, "amp": False, "pretrained": False,
                   "seed": args.seed},
        "split": str(args.split_dir), "curve": curve,
    }
    raw_path = args.out.with_suffix(".raw.json")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    raw_path.write_text(json.dumps(raw), encoding="utf-8")
    print(f"wrote {raw_path}: score it with bench/bench_quality.py --score-peer {raw_path} --out {args.out}")


if __name__ == "__main__":
    main()
