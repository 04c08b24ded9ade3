"""The Python API's throughput and memory: images/s of ``Detector(...)(photos)`` at batch 1, 4 and 8, and the
resident memory (RSS) while ``Detector.stream`` runs over a long video.

The model is the demo's trained tiny DetectoRS (``oilleak.demo.demo_checkpoint``: the shipped weights as a
checkpoint), or any checkpoint given with --ckpt. Throughput: N BSData photos (decoded by the API, as a user
passes paths), after one warm-up call, per batch size. Memory: a video of --frames frames made from BSData
photos (OpenCV's mp4v writer, 1130x460 at 10 fps) streamed frame by frame; RSS after every frame, reported at
the start, the peak and the end, and the growth per frame over the second half (a leak shows there). One
untimed pass over the photos comes first, since each new input size builds its kernels once.

    .venv/bin/python bench/bench_api.py --images 16 --frames 300 --json bench_out/api.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2
import torch

from oilleak import Detector
from oilleak.data.transforms import load_image
from oilleak.demo import demo_checkpoint

REPO = Path(__file__).resolve().parents[1]
BSDATA = Path(os.environ.get("OILLEAK_SHARED", REPO.parent / "shared")) / "data" / "bsdata" / "train"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_flags() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = lambda key: next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith(key)), "")  # noqa: E731
    flags = set(line("flags").split())
    return {"model": line("model name"), "family": line("cpu family"), "cpu_model": line("model"),
            "flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni"})}


def write_video(path: Path, photos: list[Path], frames: int, fps: float = 10.0) -> Path:
    images = [cv2.resize(load_image(p), (1130, 460))[..., ::-1] for p in photos]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (1130, 460))
    for k in range(frames):
        writer.write(images[(k // 5) % len(images)])  # each photo for half a second
    writer.release()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, help="default: the demo's trained tiny model")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_api_"))
    ckpt = args.ckpt or demo_checkpoint(work / "demo.pth")
    photos = sorted(BSDATA.glob("*.jpg"))[: args.images]
    out = {"machine": {"cpu": cpu_flags(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "load_average_before": os.getloadavg()},
           "checkpoint": str(ckpt), "device": args.device, "throughput": [], "stream": {}}
    # one untimed pass first: the photos' sizes differ, and the first pass at each input size builds its
    # kernels (oneDNN primitives), which would otherwise all land on the first batch size measured
    Detector(ckpt, args.device)(photos)
    for batch in [int(b) for b in args.batches.split(",")]:
        detector = Detector(ckpt, args.device, batch_size=batch)
        detector(photos[:batch])  # warm-up
        start = time.perf_counter()
        results = detector(photos)
        seconds = time.perf_counter() - start
        out["throughput"].append({"batch": batch, "images": len(results), "seconds": round(seconds, 2),
                                  "images_per_s": round(len(results) / seconds, 3),
                                  "leaks": sum(len(r) for r in results)})
        print(out["throughput"][-1], flush=True)

    video = write_video(work / "long.mp4", photos[:6], args.frames)
    detector = Detector(ckpt, args.device)
    rss, start = [], time.perf_counter()
    for result in detector.stream(video):
        rss.append(rss_mb())
        del result
    seconds = time.perf_counter() - start
    half = rss[len(rss) // 2:]
    out["stream"] = {"frames": len(rss), "seconds": round(seconds, 1), "frames_per_s": round(len(rss) / seconds, 3),
                     "rss_mb_first": round(rss[0], 1), "rss_mb_peak": round(max(rss), 1), "rss_mb_last": round(rss[-1], 1),
                     "rss_mb_per_frame_second_half": round((half[-1] - half[0]) / max(len(half) - 1, 1), 4)}
    out["machine"]["load_average_after"] = os.getloadavg()
    print(out["stream"], flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
