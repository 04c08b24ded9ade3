"""CPU latency of an exported model run by ONNX Runtime vs oilleak's PyTorch path, on the same image and machine;
the export time and the file size.

    python bench/bench_export.py [--preset detectors_htc_r50_tiny] [--threads 2] [--repeats 3] [--openvino]

A randomly initialised model of the preset (BatchNorm statistics from the image, so the cascade runs on
varied scores) is saved, exported with `oilleak export`'s function, and both paths predict the same BSData
image resized to 1333x800 (the preset's scale): the PyTorch path of ``Detector`` (resize, model, paste) and
``OnnxModel.detect`` (resize, graph, numpy paste); the PyTorch model is prepared as `oilleak predict` prepares it. Median wall time of ``--repeats`` runs after one warm-up,
both with the same thread count. With ``--openvino`` the ONNX file is also read by OpenVINO, if installed
(its ONNX reader has no DeformConv, so a DetectoRS file is expected to fail there; the error is printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from oilleak.config import config_from_dict  # noqa: E402
from oilleak.data.transforms import load_image, pad_batch, prepare_image  # noqa: E402
from oilleak.train.from_scratch import calibrate_frozen_batchnorm  # noqa: E402
from oilleak.export.agreement import torch_detections  # noqa: E402
from oilleak.export.onnx_export import export_checkpoint  # noqa: E402
from oilleak.export.onnx_runtime import OnnxModel  # noqa: E402
from oilleak.models.checkpoint import save_checkpoint  # noqa: E402
from oilleak.models.inference_path import prepare_for_inference  # noqa: E402
from oilleak.models.presets import build_model  # noqa: E402

SCALE = (1333, 800)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="detectors_htc_r50_tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", type=Path, default=REPO.parent / "shared/data/bsdata/train/01_200902053521_585000_090_crop_2.jpg")
    parser.add_argument("--openvino", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    photo = np.asarray(load_image(args.image).copy())
    image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).fromarray(photo).resize(SCALE))  # 1333x800
    folder = Path(tempfile.mkdtemp())
    config = config_from_dict({"data": {"data_root": "data", "classes": ["Pitting"], "scale": list(SCALE)}, "model": {"preset": args.preset}})
    torch.manual_seed(0)
    model = build_model(config.model, 1).eval()
    calibrate_frozen_batchnorm(model, [pad_batch([prepare_image(image, SCALE)[0]])[0]])
    save_checkpoint(folder / "model.pth", model=model, config=config)
    report = export_checkpoint(folder / "model.pth", folder / "model.onnx")
    onnx_model = OnnxModel(folder / "model.onnx", threads=args.threads)
    model = prepare_for_inference(model, "cpu")  # as `oilleak predict` runs it

    torch_s = timed(lambda: torch_detections(model, image, SCALE), args.repeats)
    onnx_s = timed(lambda: onnx_model.detect(image), args.repeats)
    print(f"preset {args.preset}, image {image.shape[1]}x{image.shape[0]}, {args.threads} threads, median of {args.repeats}")
    print(f"export: {report.seconds:.1f} s, file {report.size_bytes / 1e6:.1f} MB (torch {torch.__version__})")
    print(f"PyTorch path:     {torch_s:.3f} s/image")
    print(f"ONNX Runtime:     {onnx_s:.3f} s/image ({torch_s / onnx_s:.2f}x PyTorch's speed)")
    if args.openvino:
        try:
            import openvino as ov

            compiled = ov.Core().compile_model(str(folder / "model.onnx"), "CPU")
            print(f"OpenVINO (ONNX):  {timed(lambda: compiled({'image': image}), args.repeats):.3f} s/image")
        except Exception as exc:  # report what OpenVINO says, whatever it raises
            print(f"OpenVINO (ONNX):  cannot run it: {str(exc).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
