"""Prediction throughput (images/s) of `oilleak predict` on CPU, for the tiny and the full DetectoRS preset.

Each preset is built untrained, saved with save_checkpoint and loaded back the way `oilleak predict` does;
one image warms up, then N BSData images (1130x460 and the like, resized to the config's 1333x800) go
through the whole predict loop: read, infer, outlines, overlay, JSON, summary. The model's share is timed
separately. Untrained, the tiny model keeps ~94 of its 100 detections per image at the default threshold
0.3 (a worst case for the file writing: a trained model finds a few stains per image) and the full one none.
An entry may also name a trained checkpoint instead of a preset (``demo_output/train/latest.pth:100``).

The resident memory (RSS) after each image is recorded: its value after the first image, after the last one,
and the growth per image over the second half of the run (a leak shows there; allocator warm-up shows in the
first half), with the process's peak.

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_predict.py --presets detectors_htc_r50_tiny:5,detectors_htc_r50:3
    .venv/bin/python bench/bench_predict.py --presets demo_output/train/latest.pth:100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from oilleak.config import config_from_dict
from oilleak.data.transforms import load_image
from oilleak.models.checkpoint import save_checkpoint
from oilleak.models.presets import build_model
from oilleak.predict.backends import load_backend
from oilleak.predict.detector import Detector
from oilleak.predict.predictor import find_images, predict_images

REPO = Path(__file__).resolve().parents[1]
BSDATA = Path(os.environ.get("OILLEAK_SHARED", REPO.parent / "shared")) / "data" / "bsdata" / "train"


def rss_gb() -> float:
    """The process's resident memory now (not its peak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class Timed:
    """The model's backend, with the seconds spent inside it and the RSS after each call."""

    def __init__(self, backend):
        self.backend, self.seconds, self.rss = backend, 0.0, []
        self.classes, self.scale, self.score_thr = backend.classes, backend.scale, backend.score_thr
        self.device, self.batched, self.info = backend.device, backend.batched, backend.info

    def __call__(self, images, min_score):
        start = time.perf_counter()
        out = self.backend(images, min_score)
        self.seconds += time.perf_counter() - start
        self.rss.append(rss_gb())
        return out


def checkpoint(entry: str, work: Path) -> Path:
    """A preset built untrained and saved, or a checkpoint's path."""
    if entry.endswith(".pth"):
        return Path(entry)
    config = config_from_dict({"data": {"data_root": "unused", "classes": ["Pitting"]}, "model": {"preset": entry}})
    torch.manual_seed(0)
    save_checkpoint(work / f"{entry}.pth", model=build_model(config.model, 1), config=config)
    return work / f"{entry}.pth"


def bench(entry: str, images: list[Path], warmup: Path, work: Path, device: torch.device) -> dict:
    timed = Timed(load_backend(checkpoint(entry, work), device))  # loaded as `oilleak predict` loads it
    detector = Detector.from_backend(timed)
    detector(load_image(warmup))
    timed.seconds, timed.rss = 0.0, []
    sources, _ = find_images([str(p) for p in images])
    start = time.perf_counter()
    report = predict_images(detector, sources, work / Path(entry).stem, progress=False)
    total = time.perf_counter() - start
    half = timed.rss[len(timed.rss) // 2:]
    return {
        "model": entry,
        "preset": timed.info()["preset"],
        "images": report.processed,
        "sizes": sorted({f"{load_image(p).shape[1]}x{load_image(p).shape[0]}" for p in images}),
        "instances_per_image": report.instances / report.processed,
        "seconds_total": round(total, 2),
        "seconds_model": round(timed.seconds, 2),
        "images_per_s": round(report.processed / total, 4),
        "model_s_per_image": round(timed.seconds / report.processed, 2),
        "outputs_s_per_image": round((total - timed.seconds) / report.processed, 2),
        "rss_gb_after_first": round(timed.rss[0], 3),
        "rss_gb_after_last": round(timed.rss[-1], 3),
        "rss_mb_per_image_second_half": round(1024 * (half[-1] - half[0]) / max(len(half) - 1, 1), 3),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="detectors_htc_r50_tiny:5,detectors_htc_r50:3", help="PRESET:N_IMAGES,...")
    parser.add_argument("--images", type=Path, default=BSDATA, help="folder of images (default: ../shared BSData)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)

    files = sorted(args.images.glob("*.jpg"))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average_before": os.getloadavg(),
    }
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for item in args.presets.split(","):
            preset, n = item.split(":")
            results.append(bench(preset, files[1 : 1 + int(n)], files[0], Path(tmp), device))
            print(json.dumps(results[-1]), flush=True)
    machine["load_average_after"] = os.getloadavg()
    print(json.dumps(machine))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
