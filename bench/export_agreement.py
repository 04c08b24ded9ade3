"""ONNX export vs PyTorch on real images: end-to-end agreement of the detections and step-by-step errors.

    python bench/export_agreement.py CKPT IMAGES... [--onnx FILE] [--limit N] [--min-score S]

Exports CKPT with every step's result as extra outputs (unless --onnx names such a file, or --no-steps), runs it with
ONNX Runtime on the images (files or folders) and prints: detections matched (same label, box IoU >= 0.99,
score within 1e-3; ``oilleak.export.agreement``), the fraction of matched masks with IoU >= 0.98, and per
step (pyramid levels, every box stage's logits and deltas, the merged masks) the largest difference
PyTorch vs ONNX Runtime on the same input, absolute and relative to the largest value.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oilleak.data.transforms import load_image  # noqa: E402
from oilleak.predict.predictor import IMAGE_EXTENSIONS  # noqa: E402
from oilleak.export.agreement import Agreement, StageErrors, compare, stage_errors, torch_detections  # noqa: E402
from oilleak.export.onnx_export import export_checkpoint  # noqa: E402
from oilleak.export.onnx_runtime import OnnxModel  # noqa: E402
from oilleak.models.checkpoint import model_from_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--onnx", type=Path, help="an export of CKPT made with stages=True (default: export now)")
    parser.add_argument("--limit", type=int, default=20, help="images to compare")
    parser.add_argument("--min-score", type=float, default=0.0, help="compare only detections scoring at least this")
    parser.add_argument("--no-steps", action="store_true", help="end to end only (a plain export, faster)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    images = []
    for path in args.images:
        images += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if path.is_dir() else [path]
    images = images[: args.limit]
    onnx_path = args.onnx
    if onnx_path is None:
        onnx_path = Path(tempfile.mkdtemp()) / "stages.onnx"
        report = export_checkpoint(args.ckpt, onnx_path, stages=not args.no_steps)
        print(f"exported {onnx_path} in {report.seconds:.0f} s, {report.size_bytes / 1e6:.1f} MB")
    model, config = model_from_checkpoint(args.ckpt)
    onnx_model = OnnxModel(onnx_path)
    total, errors = Agreement(), StageErrors()
    for path in images:
        image = load_image(path)
        start = time.perf_counter()
        ref = torch_detections(model, image, tuple(config.data.scale))
        got = onnx_model.detect(image)
        keep = ref.scores >= args.min_score
        ref = type(ref)(ref.boxes[keep], ref.scores[keep], ref.labels[keep], ref.masks[keep])
        got_keep = got.scores >= args.min_score
        got.boxes, got.scores, got.labels = got.boxes[got_keep], got.scores[got_keep], got.labels[got_keep]
        got.windows = [w for w, k in zip(got.windows, got_keep) if k]
        got.origins = [o for o, k in zip(got.origins, got_keep) if k]
        result = compare(ref, got)
        total.add(result)
        if not args.no_steps:
            stage_errors(model, onnx_model, image, errors)
        print(f"{path.name}: torch {result.torch_detections}, onnx {result.onnx_detections}, matched {result.matched}, "
              f"masks IoU>=0.98 {result.masks_at_least(0.98):.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"\n{len(images)} images: {total.matched}/{total.torch_detections} PyTorch detections matched "
          f"({total.onnx_detections} from ONNX), matched fraction {total.matched_fraction:.4f}; "
          f"matched masks with IoU >= 0.98: {total.masks_at_least(0.98):.4f} (min IoU {min(total.mask_ious, default=1):.4f})")
    if errors.errors:
        print("step                  max |diff|    max |value|   relative")
    for name in errors.errors:
        print(f"{name:20s} {errors.errors[name]:12.3g} {errors.scales[name]:12.3g} {errors.relative(name):10.2e}")


if __name__ == "__main__":
    main()
