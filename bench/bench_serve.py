"""Requests/s and latency (p50/p95/p99) of `oilleak serve` under 1, 4 and 16 concurrent clients, with and
without batching, for the tiny and the full DetectoRS preset, on CPU or a GPU.

Each preset is built untrained and saved with save_checkpoint; the server runs as its own process on
127.0.0.1 (`oilleak serve CKPT --workers W --queue 64 --max-batch B`), and closed-loop clients (threads with
one keep-alive connection each) POST a BSData photo (1130x460, resized by the model to the config's scale)
to /predict until N answers have come back per concurrency level. The peer in the same run: the same model
called directly in this process on the same photo (no HTTP, no queue), so the server's own cost shows.
`--score-thr 0.99` by default: the untrained models' detections then stay below it and the answer holds the
model's work only (outlines of ~100 noisy instances per photo would dominate and say nothing about serving).

    .venv/bin/python bench/bench_serve.py --presets detectors_htc_r50_tiny --clients 1,4,16 --requests 24
    .venv/bin/python bench/bench_serve.py --device cuda --presets detectors_htc_r50_tiny,detectors_htc_r50 \\
        --clients 1,4,16 --requests 200 --max-batch 1,8 --json bench_serve_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PHOTO = sorted((REPO / "sample" / "bsdata").glob("*.jpg"))[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(preset: str, work: Path) -> Path:
    from oilleak.config import config_from_dict
    from oilleak.models.checkpoint import save_checkpoint
    from oilleak.models.presets import build_model

    config = config_from_dict({"data": {"data_root": "unused", "classes": ["sly_bjbmyw", "sly_dmyw"]},
                               "model": {"preset": preset}})
    torch.manual_seed(0)
    path = work / f"{preset}.pth"
    save_checkpoint(path, model=build_model(config.model, 2), config=config)
    return path


def direct_latency(ckpt: Path, device: str, repeats: int) -> dict:
    """The peer: the model called in this process on the same photo, as the server's workers call it."""
    from oilleak.data.transforms import load_image
    from oilleak.predict.detector import Detector

    model = Detector(ckpt, device)
    image = load_image(PHOTO)
    model.predict_arrays([image], model.score_thr)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict_arrays([image], model.score_thr)  # what the server's pool runs
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"direct_p50_ms": round(statistics.median(seconds) * 1000, 1)}


def start_server(ckpt: Path, log: Path, *options: str, api_key: str | None = None):
    """`oilleak serve CKPT --port P OPTIONS...` on 127.0.0.1 and a free port, once it answers /health; the
    process and its URL (also used by bench/fuzz_serve.py and bench/soak_serve.py)."""
    port = free_port()
    command = [sys.executable, "-m", "oilleak", "serve", str(ckpt), "--port", str(port), *options]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OILLEAK_API_KEY", None)
    if api_key:
        env["OILLEAK_API_KEY"] = api_key
    process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"the server did not start:\n{log.read_text()}")


def load(url: str, clients: int, requests: int, score_thr: float) -> dict:
    data = PHOTO.read_bytes()
    latencies: list[float] = []
    failures: list[int] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as session:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                start = time.perf_counter()
                response = session.post("/predict", params={"score_thr": score_thr}, files={"image": (PHOTO.name, data)})
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies if response.status_code == 200 else failures).append(
                        elapsed if response.status_code == 200 else response.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"clients": clients, "requests": requests, "failed": len(failures), "requests_per_s": round(len(latencies) / wall, 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="detectors_htc_r50_tiny", help="comma-separated presets")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels")
    parser.add_argument("--requests", type=int, default=24, help="answers per concurrency level")
    parser.add_argument("--max-batch", default="1", help="comma-separated: 1 is no batching, e.g. 1,8 for off and on")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--score-thr", type=float, default=0.99)
    parser.add_argument("--direct", type=int, default=5, help="direct (in-process) calls for the peer's p50")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for preset in args.presets.split(","):
            ckpt = make_checkpoint(preset, work)
            peer = direct_latency(ckpt, args.device, args.direct)
            for max_batch in (int(b) for b in args.max_batch.split(",")):
                process, url = start_server(ckpt, work / "server.log", "--device", args.device, "--workers", str(args.workers),
                                            "--queue", "64", "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms))
                try:
                    done = (0, 0)  # images and batches the server had run before this level
                    for clients in (int(c) for c in args.clients.split(",")):
                        row = {"preset": preset, "device": args.device, "workers": args.workers, "max_batch": max_batch,
                               **load(url, clients, args.requests, args.score_thr), **peer}
                        health = httpx.get(url + "/health").json()
                        now = (health["images_predicted"], health["pool"]["batches"])
                        row["images_per_batch"] = round((now[0] - done[0]) / max(now[1] - done[1], 1), 2)
                        done = now
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                finally:
                    process.send_signal(signal.SIGTERM)
                    process.wait(120)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
            "load_average": os.getloadavg(), "photo": PHOTO.name, "score_thr": args.score_thr}
    print(json.dumps(meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
