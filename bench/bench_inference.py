"""CPU inference latency of a full-size oilleak model on one image, and the same for mmdet (the peer).

    python bench/bench_inference.py                      # detectors_htc_r50, 6 classes, 800x1333, 3 runs
    python bench/bench_inference.py --peer /tmp/mmdet_peer   # also run mmdet 3.3 in the same session
    python bench/bench_inference.py --device cuda --runs 20  # on a GPU (TF32 as PyTorch defaults: off for matmul, on for cuDNN)
    python bench/bench_inference.py --profile --path reference  # time the reference path; operator split of both

Random weights (ConvAWS gamma/beta set as ImageNet loading would, like the peer's script), a random
normalised 800x1333 image padded to 800x1344, batch 1, ``torch.inference_mode()``, all cores. One warm-up
run, then the median of ``--runs``. The timed call is ``model(images, metas)`` in eval mode, i.e.
``model.predict``, the path `oilleak parity` checks against mmdet; every run's detections must be identical.
Peak RSS is the process high-water mark (model build included); on CUDA also torch's peak allocated GPU
memory, and each run ends with a synchronize so the time is the GPU's too. Results go to stdout and, with
--json, a file.

Beside the random image, a real photo (``--photo``, a BSData image by default) is timed from its file: each
tool reads it and resizes it to fit 1333x800 with its own pipeline (oilleak's ``prepare_image``, mmdet's test
pipeline in bench/mmdet_photo_latency.py), so that time includes decoding and resizing.

Two paths: ``default`` is the model as `oilleak predict` runs it (``prepare_for_inference``: BatchNorm folded,
channels-last on CPU; the vectorised deformable convolution); ``reference`` is the plain eval-mode model
with torchvision's deformable convolution (mmcv's kernel, bit for bit), the path before the CPU speed work.
``--path`` chooses the timed one; ``--profile`` prints the CPU time per operator of one more run of each
(after the peak RSS is read, so the profiles' extra model does not count).
"""

from __future__ import annotations

import argparse
import contextlib
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
from oilleak.data.transforms import load_image, pad_batch, prepare_image
from oilleak.models.deform_conv import reference_kernel
from oilleak.models.inference_path import prepare_for_inference
from oilleak.models.layers import ConvAWS2d
from oilleak.models.presets import build_model
from oilleak.structures import Detections, ImageMeta

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OILLEAK_SHARED", REPO.parent / "shared"))  # as in tests/conftest.py
PEER_SCRIPT = SHARED / "peers" / "mmdet" / "bench" / "mmdet_cpu_latency.py"
PEER_PHOTO_SCRIPT = REPO / "bench" / "mmdet_photo_latency.py"
DEFAULT_PHOTO = SHARED / "data" / "bsdata" / "train" / "01_200902053521_585000_090_crop_2.jpg"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict:
    """What the figures were measured on (the load average again at the end, as ``load_avg_after``)."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_avg_before": os.getloadavg(),
    }


def same_detections(a: list[Detections], b: list[Detections]) -> bool:
    return all(
        torch.equal(x.boxes, y.boxes) and torch.equal(x.scores, y.scores) and torch.equal(x.labels, y.labels)
        and torch.equal(x.masks, y.masks)
        for x, y in zip(a, b, strict=True)
    )


def timed_runs(call, runs: int, cuda: bool, device: torch.device) -> tuple[list[float], list, bool]:
    """Times of the warm-up and ``runs`` calls, the first call's output, and whether every output equalled it.

    Only one output is kept: a run's full-size masks are ~100 MB, and keeping them all would count in the
    peak RSS, which is meant to be the model's.
    """
    times, first, identical = [], None, True
    for _ in range(runs + 1):  # the first run is the warm-up
        start = time.perf_counter()
        output = call()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        if first is None:
            first = output
        else:
            identical = identical and same_detections(output, first)
        del output
    return times, first, identical


def operator_profile(call, rows: int = 15) -> list[str]:
    """The operators taking the most CPU time in one call (self time, so nested ops are not counted twice)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [f"{'all operators':<45} {total / 1e6:8.3f} s"] + [
        f"{e.key:<45} {e.self_cpu_time_total / 1e6:8.3f} s {100 * e.self_cpu_time_total / total:5.1f}%  x{e.count}"
        for e in events[:rows]]


def random_model_and_image(preset: str, num_classes: int, height: int, width: int):
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
    return model, images, metas


def path_model(path: str, preset: str, num_classes: int, height: int, width: int, device: torch.device):
    """The random model on ``device``, prepared as ``path`` runs it; its image and metas; the kernel context."""
    model, images, metas = random_model_and_image(preset, num_classes, height, width)
    if path == "default":
        return prepare_for_inference(model, device), images.to(device), metas, contextlib.nullcontext
    return model.to(device), images.to(device), metas, reference_kernel


def profiles(preset: str, num_classes: int, height: int, width: int, device: torch.device) -> dict:
    """One profiled run of each path after a warm-up (the before/after of the CPU speed work)."""
    out = {}
    for path in ("reference", "default"):
        model, images, metas, kernel = path_model(path, preset, num_classes, height, width, device)
        with torch.inference_mode(), kernel():
            model(images, metas)
            out[f"profile_{path}"] = operator_profile(lambda: model(images, metas))
        del model
    return out


def run_oilleak(preset: str, num_classes: int, height: int, width: int, runs: int, device: torch.device,
                photo: Path | None, profile: bool, path: str) -> dict:
    model, images, metas, timed_kernel = path_model(path, preset, num_classes, height, width, device)
    cuda = device.type == "cuda"

    def on_photo() -> list[Detections]:
        tensor, meta = prepare_image(load_image(photo), (1333, 800))
        batch, _ = pad_batch([tensor])
        return model(batch.to(device), [meta])

    with torch.inference_mode(), timed_kernel():
        times, first, identical = timed_runs(lambda: model(images, metas), runs, cuda, device)
        identical = identical and same_detections(first, model.predict(images, metas))
        detections = len(first[0])
        del first
        photo_result = {}
        if photo is not None:
            photo_times, photo_first, _ = timed_runs(on_photo, runs, cuda, device)
            photo_result = {"photo": {
                "file": photo.name,
                "input": list(prepare_image(load_image(photo), (1333, 800))[0].shape[-2:]),
                "median_s": statistics.median(photo_times[1:]),
                "times_s": [round(t, 3) for t in photo_times],
                "detections": len(photo_first[0]),
            }}
    gpu = {"peak_gpu_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30} if cuda else {}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB
    return {**gpu,
        "median_s": statistics.median(times[1:]),
        "times_s": [round(t, 3) for t in times],
        "detections": detections,
        "outputs_identical_to_predict": identical,
        **photo_result,
        "peak_rss_gb": peak_rss,
        **(profiles(preset, num_classes, height, width, device) if profile else {}),
    }


def peer_median(cmd: list[str]) -> tuple[float | None, list[str], str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None, [], f"peer failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    # mmengine logs every parameter's init first; the script's own two lines come last
    summary = [line for line in proc.stdout.splitlines() if line.startswith(("classes ", "photo ", "median_s "))]
    return float(summary[-1].split()[1]), summary, ""


def run_peer(venv: Path, height: int, width: int, runs: int, num_classes: int, photo: Path | None) -> dict:
    python = venv / "bin" / "python"
    if not python.exists():
        return {"skipped": f"no peer venv at {venv} (bash ../shared/peers/mmdet/setup_cpu.sh {venv})"}
    median, summary, error = peer_median([str(python), str(PEER_SCRIPT), str(height), str(width), str(runs), str(num_classes)])
    if error:
        return {"skipped": error}
    result = {"median_s": median, "output": summary}
    if photo is not None:
        photo_median, photo_summary, error = peer_median([str(python), str(PEER_PHOTO_SCRIPT), str(photo), str(runs), str(num_classes)])
        result["photo"] = {"skipped": error} if error else {"median_s": photo_median, "output": photo_summary}
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child
    return result


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
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="a real photo, timed from its file")
    parser.add_argument("--no-photo", action="store_true", help="time the random image only")
    parser.add_argument("--profile", action="store_true", help="print oilleak's CPU time per operator")
    parser.add_argument("--profile-only", action="store_true",
                        help="oilleak only: the two profiles (no timed runs, no peer)")
    parser.add_argument("--path", choices=["default", "reference"], default="default",
                        help="the timed path: as `oilleak predict` runs the model, or the plain reference model")
    args = parser.parse_args()
    device = torch.device(args.device)
    photo = None if args.no_photo else args.photo

    torch.set_num_threads(os.cpu_count() or 1)
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device),
        "image": [args.height, args.width],
        "path": args.path,
    }
    if args.profile_only:
        result["oilleak"] = profiles(args.preset, args.classes, args.height, args.width, device)
        print(json.dumps(result, indent=2))
        return
    # The peer runs first: a child's peak RSS starts from the parent's at fork, so the parent must be small.
    if args.peer:
        result["mmdet_peer"] = run_peer(args.peer, args.height, args.width, args.runs, args.classes, photo)
    result["oilleak"] = run_oilleak(args.preset, args.classes, args.height, args.width, args.runs, device, photo, args.profile, args.path)
    peer = result.get("mmdet_peer", {})
    if "median_s" in peer:
        result["speedup_vs_mmdet"] = peer["median_s"] / result["oilleak"]["median_s"]
    if "median_s" in peer.get("photo", {}) and "photo" in result["oilleak"]:
        result["speedup_vs_mmdet_photo"] = peer["photo"]["median_s"] / result["oilleak"]["photo"]["median_s"]
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
