"""ONNX export vs PyTorch on real images: end-to-end agreement of the detections and step-by-step errors.

    python bench/export_agreement.py CKPT IMAGES... [--onnx FILE] [--fp16] [--limit N] [--min-score S] [--threads T]

Exports CKPT with every step's result as extra outputs (unless --onnx names such a file, or --no-steps), runs it with
ONNX Runtime on the images (files or folders) and prints: detections matched (same label, box IoU >= 0.99,
score within 1e-3; ``oilleak.export.agreement``), the fraction of matched masks with IoU >= 0.98, and per
step (pyramid levels, every box stage's logits and deltas, the merged masks) the largest difference
PyTorch vs ONNX Runtime on the same input, absolute and relative to the largest value; and ONNX Runtime's
median time per image (resize, graph, paste). With --fp16 the file is a float16 export (``oilleak export
--fp16``; with --onnx, the file given is one) and a match allows scores within 1e-2, counted at box IoU >= 0.9
and >= 0.99.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oilleak.data.transforms import load_image  # noqa: E402
from oilleak.predict.predictor import IMAGE_EXTENSIONS  # noqa: E402
from oilleak.export.agreement import FP16_SCORE_DIFF, MAX_SCORE_DIFF, MIN_BOX_IOU, Agreement, StageErrors, compare, stage_errors  # noqa: E402
from oilleak.export.onnx_export import export_checkpoint  # noqa: E402
from oilleak.export.onnx_runtime import OnnxModel  # noqa: E402
from oilleak.models.checkpoint import model_from_checkpoint  # noqa: E402
from oilleak.predict.detector import Detector  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--onnx", type=Path, help="an export of CKPT made with stages=True (default: export now)")
    parser.add_argument("--limit", type=int, default=20, help="images to compare")
    parser.add_argument("--min-score", type=float, default=0.0, help="compare only detections scoring at least this")
    parser.add_argument("--no-steps", action="store_true", help="end to end only (a plain export, faster)")
    parser.add_argument("--fp16", action="store_true", help="a float16 export, compared at float16 bounds")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads (ONNX Runtime keeps its default: one per core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # (box IoU, score difference) of a match; the first one's masks are compared
    bounds = [(0.9, FP16_SCORE_DIFF), (MIN_BOX_IOU, FP16_SCORE_DIFF)] if args.fp16 else [(MIN_BOX_IOU, MAX_SCORE_DIFF)]

    images = []
    for path in args.images:
        images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if path.is_dir() else [path]
    images = images[: args.limit]
    onnx_path = args.onnx
    if onnx_path is None:
        onnx_path = Path(tempfile.mkdtemp()) / "stages.onnx"
        report = export_checkpoint(args.ckpt, onnx_path, stages=not args.no_steps, fp16=args.fp16)
        print(f"exported {onnx_path} in {report.seconds:.0f} s, {report.size_bytes / 1e6:.1f} MB")
    # both through the Python API, as `oilleak predict` runs them
    checkpoint, exported = Detector(args.ckpt, "cpu", args.min_score), Detector(onnx_path, "cpu", args.min_score)
    model, onnx_model = (model_from_checkpoint(args.ckpt)[0], OnnxModel(onnx_path, threads=args.threads)) if not args.no_steps else (None, None)
    totals, errors, seconds = [Agreement() for _ in bounds], StageErrors(), []
    for path in images:
        image = load_image(path)
        (ref,) = checkpoint(image)
        start = time.perf_counter()
        (got,) = exported(image)
        seconds.append(time.perf_counter() - start)
        results = [compare(ref, got, iou, score) for iou, score in bounds]
        for total, result in zip(totals, results):
            total.add(result)
        if not args.no_steps:
            stage_errors(model, onnx_model, image, errors)
        matched = ", ".join(f"{result.matched} at IoU >= {iou}" for result, (iou, _) in zip(results, bounds))
        print(f"{path.name}: torch {results[0].torch_detections}, onnx {results[0].onnx_detections}, matched {matched}, "
              f"masks IoU>=0.98 {results[0].masks_at_least(0.98):.3f} (ONNX Runtime {seconds[-1]:.2f} s)", flush=True)
    total = totals[0]
    print(f"\n{len(images)} images, {total.torch_detections} PyTorch detections, {total.onnx_detections} from ONNX; matched "
          f"(same label, score within {bounds[0][1]:g}):")
    for result, (iou, _) in zip(totals, bounds):
        print(f"  box IoU >= {iou}: {result.matched} (fraction {result.matched_fraction:.4f})")
    print(f"matched masks (IoU >= {bounds[0][0]}): IoU >= 0.98 {total.masks_at_least(0.98):.4f}, mean IoU "
          f"{statistics.fmean(total.mask_ious or [1]):.4f}, min {min(total.mask_ious, default=1):.4f}")
    print(f"ONNX Runtime through the Detector (its default thread count): median {statistics.median(seconds):.3f} s/image")
    if errors.errors:
        print("step                  max |diff|    max |value|   relative")
    for name in errors.errors:
        print(f"{name:20s} {errors.errors[name]:12.3g} {errors.scales[name]:12.3g} {errors.relative(name):10.2e}")


if __name__ == "__main__":
    main()
