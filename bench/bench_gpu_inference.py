"""GPU inference of a full-size oilleak model: batch sizes x precisions, time, images/s, peak GPU memory.
(CPU latency beside mmdetection: bench_inference.py; the GPU peer: ../shared/peers/mmdet/bench/mmdet_gpu_bench.py,
both in bench/gpu_check.sh.)

    python bench/bench_gpu_inference.py --device cuda --runs 20                                   # batch 1, fp32
    python bench/bench_gpu_inference.py --device cuda --batch 1 4 8 --precision fp32 tf32 bf16    # a table

Precisions: ``fp32`` PyTorch's defaults (TF32 off for matmul, on for cuDNN convolutions: what mmdet runs
with), ``strict`` TF32 off everywhere, ``tf32`` TF32 on everywhere, ``bf16`` bfloat16 autocast. With more
than one precision, each one's detections at the largest batch are matched against ``strict``'s (same
class, box IoU >= 0.9, one to one): the share of ``strict``'s detections found. RANDOM WEIGHTS AMPLIFY
ROUNDING (the random SAC stages multiply a relative difference ~30-fold per stage), so this agreement is a
lower bound; a trained model's agreement is the figure that decides a default.

Random weights (ConvAWS gamma/beta set as ImageNet loading would, like the peer's script), a random
normalised 800x1333 image per batch item padded to 800x1344, ``torch.inference_mode()``. One warm-up
run, then the median of ``--runs``. The timed call is ``model(images, metas)`` in eval mode, i.e.
``model.predict``, the path `oilleak parity` checks against mmdet; every run's detections must be identical.
Peak RSS is the process high-water mark (model build included); on CUDA also torch's peak allocated GPU
memory, and each run ends with a synchronize so the time is the GPU's too. Results go to stdout and, with
--json, a file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from oilleak.config import ModelConfig
from oilleak.models.layers import ConvAWS2d
from oilleak.models.presets import build_model
from oilleak.structures import Detections, ImageMeta

from bench_inference import machine, same_detections  # bench/ is the script's folder: on sys.path


def set_precision(precision: str) -> tuple[torch.dtype | None, bool, bool]:
    """(autocast dtype or None, TF32 for matmul, TF32 for cuDNN) of a ``--precision`` name."""
    return {"fp32": (None, False, True), "strict": (None, False, False), "tf32": (None, True, True),
            "bf16": (torch.bfloat16, False, True)}[precision]


def matched_fraction(reference: list[Detections], other: list[Detections], iou: float = 0.9) -> float:
    """Share of the reference detections with a same-class detection of ``other`` at box IoU >= ``iou``
    (greedy, one to one, in the reference's score order)."""
    from torchvision.ops import box_iou

    found = total = 0
    for ref, oth in zip(reference, other, strict=True):
        total += len(ref)
        if len(ref) == 0 or len(oth) == 0:
            continue
        ious = box_iou(ref.boxes.float(), oth.boxes.float())
        ious[ref.labels[:, None] != oth.labels[None, :]] = 0
        taken = torch.zeros(len(oth), dtype=torch.bool)
        for row in ious.cpu():
            row[taken] = 0
            best = int(row.argmax())
            if row[best] >= iou:
                taken[best] = True
                found += 1
    return found / total if total else float("nan")


def build_random_model(preset: str, num_classes: int, device: torch.device):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset), num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConvAWS2d):
                m.match_gamma_beta_to_weight()
    return model.to(device)


def random_batch(batch: int, height: int, width: int, device: torch.device):
    """``batch`` different random normalised images padded to a multiple of 32, with their metas."""
    pad_h, pad_w = -(-height // 32) * 32, -(-width // 32) * 32
    generator = torch.Generator().manual_seed(1)
    images = torch.zeros(batch, 3, pad_h, pad_w)
    images[:, :, :height, :width] = torch.randn(batch, 3, height, width, generator=generator)
    metas = [ImageMeta(i, f"random{i}", (height, width), (height, width), (pad_h, pad_w), (1.0, 1.0)) for i in range(batch)]
    return images.to(device), metas


def run_oilleak(model, batch: int, height: int, width: int, runs: int, device: torch.device,
                precision: str = "fp32") -> tuple[dict, list[Detections]]:
    """Median seconds of ``model(images, metas)`` on ``batch`` images in ``precision``; the last run's detections."""
    images, metas = random_batch(batch, height, width, device)
    cuda = device.type == "cuda"
    dtype, tf32_matmul, tf32_cudnn = set_precision(precision)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_matmul, tf32_cudnn
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, outputs = [], []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for _ in range(runs + 1):  # the first run is the warm-up
            start = time.perf_counter()
            outputs.append(model(images, metas))
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        reference = model.predict(images, metas)
    identical = all(same_detections(out, reference) for out in outputs)
    gpu = {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30} if cuda else {}
    median = statistics.median(times[1:] or times)  # runs=0: the warm-up alone (a reference run)
    return {**gpu,
        "precision": precision,
        "batch": batch,
        "median_s": median,
        "ms_per_image": 1000 * median / batch,
        "times_s": [round(t, 3) for t in times],
        "detections": len(outputs[-1][0]),
        "outputs_identical_to_predict": identical,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # ru_maxrss is in KiB
    }, outputs[-1]


def run_matrix(args: argparse.Namespace, device: torch.device) -> dict:
    """Every (precision, batch) of the arguments; with several precisions, their agreement with ``strict``."""
    model = build_random_model(args.preset, args.classes, device)
    rows, last = [], {}
    for precision in args.precision:
        for batch in args.batch:
            try:
                row, dets = run_oilleak(model, batch, args.height, args.width, args.runs, device, precision)
            except Exception as exc:  # e.g. an op without a bf16 kernel: reported, the other rows still run
                row, dets = {"precision": precision, "batch": batch, "error": f"{type(exc).__name__}: {exc}"[:400]}, None
            rows.append(row)
            print(json.dumps(row), flush=True)
            if batch == max(args.batch) and dets is not None:
                last[precision] = dets
    out = {"rows": rows}
    if len(args.precision) > 1:
        largest = max(args.batch)
        if "strict" not in last:
            _, last["strict"] = run_oilleak(model, largest, args.height, args.width, 0, device, "strict")
        out["matched_fraction_vs_strict_fp32"] = {
            p: matched_fraction(last["strict"], dets) for p, dets in last.items() if p != "strict"
        }
        out["agreement_note"] = (f"{largest} random images, random weights (amplify rounding: a lower bound), "
                                 "same class and box IoU >= 0.9")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # PyTorch's defaults
    return out


def print_table(matrix: dict) -> None:
    print("\n| precision | batch | s / call | ms / image | images / s | peak GPU memory (GB) |\n|---|---:|---:|---:|---:|---:|")
    for row in matrix["rows"]:
        if "error" in row:
            print(f"| {row['precision']} | {row['batch']} | failed: {row['error'][:80]} | | | |")
            continue
        peak = row.get("peak_gpu_memory_gb")
        print(f"| {row['precision']} | {row['batch']} | {row['median_s']:.4f} | {row['ms_per_image']:.1f} | "
              f"{1000 / row['ms_per_image']:.1f} | {'' if peak is None else f'{peak:.2f}'} |")
    for precision, share in matrix.get("matched_fraction_vs_strict_fp32", {}).items():
        print(f"{precision}: {share:.3f} of strict fp32's detections matched ({matrix['agreement_note']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="detectors_htc_r50")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="images per call (several: a table)")
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "strict", "tf32", "bf16"])
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device),
        "image": [args.height, args.width],
    }
    if args.batch == [1] and args.precision == ["fp32"]:
        model = build_random_model(args.preset, args.classes, device)
        result["oilleak"], _ = run_oilleak(model, 1, args.height, args.width, args.runs, device)
        ok = result["oilleak"]["outputs_identical_to_predict"]
    else:
        result["oilleak_matrix"] = run_matrix(args, device)
        print_table(result["oilleak_matrix"])
        ok = all(r.get("outputs_identical_to_predict", True) for r in result["oilleak_matrix"]["rows"])
    result["machine"]["load_avg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if not ok:
        sys.exit("the timed runs' detections differ from model.predict's")


if __name__ == "__main__":
    main()
