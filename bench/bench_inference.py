"""CPU inference latency of a full-size oilleak model on one image, and the same for mmdet (the peer).

    python bench/bench_inference.py                      # detectors_htc_r50, 6 classes, 800x1333, 3 runs
    python bench/bench_inference.py --peer /tmp/mmdet_peer   # also run mmdet 3.3 in the same session
    python bench/bench_inference.py --device cuda --runs 20  # on a GPU (TF32 as PyTorch defaults: off for matmul, on for cuDNN)

Random weights (ConvAWS gamma/beta set as ImageNet loading would, like the peer's script), a random
normalised 800x1333 image padded to 800x1344, batch 1, ``torch.inference_mode()``, all cores. One warm-up
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
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from oilleak.config import ModelConfig
from oilleak.models.layers import ConvAWS2d
from oilleak.models.presets import build_model
from oilleak.structures import Detections, ImageMeta

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OILLEAK_SHARED", REPO.parent / "shared"))  # as in tests/conftest.py
PEER_SCRIPT = SHARED / "peers" / "mmdet" / "bench" / "mmdet_cpu_latency.py"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def same_detections(a: list[Detections], b: list[Detections]) -> bool:
    return all(
        torch.equal(x.boxes, y.boxes) and torch.equal(x.scores, y.scores) and torch.equal(x.labels, y.labels)
        and torch.equal(x.masks, y.masks)
        for x, y in zip(a, b, strict=True)
    )


def run_oilleak(preset: str, num_classes: int, height: int, width: int, runs: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset), num_classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ConvAWS2d):
                m.match_gamma_beta_to_weight()
    pad_h, pad_w = -(-height // 32) * 32, -(-width // 32) * 32
    images = torch.zeros(1, 3, pad_h, pad_w)
    images[:, :, :height, :width] = torch.randn(1, 3, height, width)
    metas = [ImageMeta(0, "random", (height, width), (height, width), (pad_h, pad_w), (1.0, 1.0))]
    model, images = model.to(device), images.to(device)
    cuda = device.type == "cuda"

    times, outputs = [], []
    with torch.inference_mode():
        for _ in range(runs + 1):  # the first run is the warm-up
            start = time.perf_counter()
            outputs.append(model(images, metas))
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        reference = model.predict(images, metas)
    identical = all(same_detections(out, reference) for out in outputs)
    gpu = {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30} if cuda else {}
    return {**gpu,
        "median_s": statistics.median(times[1:]),
        "times_s": [round(t, 3) for t in times],
        "detections": len(outputs[-1][0]),
        "outputs_identical_to_predict": identical,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # ru_maxrss is in KiB
    }


def run_peer(venv: Path, height: int, width: int, runs: int) -> dict:
    python = venv / "bin" / "python"
    if not python.exists():
        return {"skipped": f"no peer venv at {venv} (bash ../shared/peers/mmdet/setup_cpu.sh {venv})"}
    cmd = [str(python), str(PEER_SCRIPT), str(height), str(width), str(runs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child: the peer
    if proc.returncode != 0:
        return {"skipped": f"peer failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"}
    # mmengine logs every parameter's init first; the script's own two lines come last
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("threads ", "median_s "))]
    median = float(summary[-1].split()[1])
    return {"median_s": median, "output": summary, "peak_rss_gb": peak_kib / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="detectors_htc_r50")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--peer", type=Path, help="venv of the mmdet peer (setup_cpu.sh); omitted: no peer run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_avg_before": os.getloadavg(),
        },
        "image": [args.height, args.width],
    }
    # The peer runs first: a child's peak RSS starts from the parent's at fork, so the parent must be small.
    if args.peer:
        result["mmdet_peer"] = run_peer(args.peer, args.height, args.width, args.runs)
    result["oilleak"] = run_oilleak(args.preset, args.classes, args.height, args.width, args.runs, device)
    if "median_s" in result.get("mmdet_peer", {}):
        result["speedup_vs_mmdet"] = result["mmdet_peer"]["median_s"] / result["oilleak"]["median_s"]
    result["machine"]["load_avg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if not result["oilleak"]["outputs_identical_to_predict"]:
        sys.exit("the timed runs' detections differ from model.predict's")


if __name__ == "__main__":
    main()
