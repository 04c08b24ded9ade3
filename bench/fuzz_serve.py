"""Schemathesis against the real `oilleak serve` on 127.0.0.1, for longer than tests/test_serve_fuzz.py: every
operation of the OpenAPI schema, all phases (examples, coverage, fuzzing, stateful), positive and negative
data, with the API key. The figures come from the server's own access log (every request schemathesis
sent carries X-Request-ID: fuzz): requests per endpoint and method, statuses, 5xx, tracebacks in the log,
then whether a real photo is still answered normally.

The checkpoint is an untrained tiny DetectoRS (bench_serve.make_checkpoint), served at a 320x192 scale.

    .venv/bin/python bench/fuzz_serve.py --max-examples 100 --seed 27
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench_serve import PHOTO, make_checkpoint, start_server

KEY = "fuzz-bench-key"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=100, help="test cases per operation and phase")
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--max-time", type=int, default=900, help="seconds for schemathesis at most")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = make_checkpoint("detectors_htc_r50_tiny", work)
        log = work / "server.log"
        process, url = start_server(ckpt, log, "--device", "cpu", "--set", "data.scale=[320,192]", api_key=KEY)
        try:
            started = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "schemathesis.cli", "run", url + "/openapi.json", "--checks", "not_a_server_error",
                 "--max-examples", str(args.max_examples), "--seed", str(args.seed), "--workers", "1",
                 "--max-time", str(args.max_time), "--request-timeout", "120", "--no-color", "--mode", "all",
                 "--phases", "examples,coverage,fuzzing,stateful", "--generation-database", "none",
                 "-H", f"X-API-Key: {KEY}", "-H", "X-Request-ID: fuzz"],
                capture_output=True, text=True, cwd=work)
            seconds = time.perf_counter() - started
            summary = run.stdout[run.stdout.rfind("Test cases:"):].splitlines()[:2]
            with PHOTO.open("rb") as photo:
                after = httpx.post(url + "/predict", params={"score_thr": 0.99}, files={"image": (PHOTO.name, photo)},
                                   headers={"X-API-Key": KEY}, timeout=120)
            health = httpx.get(url + "/health", timeout=10).json()
        finally:
            process.send_signal(signal.SIGTERM)
            exit_code = process.wait(120)
        text = log.read_text()

    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    fuzzed = [line for line in lines if line["request_id"] == "fuzz"]
    per_endpoint = collections.Counter((line["path"] if line["path"] in ("/predict", "/predict/batch", "/health", "/classes",
                                        "/openapi.json") else "other paths", line["method"], line["status"]) for line in fuzzed)
    print(f"schemathesis {run.returncode=} in {seconds:.0f} s; {' '.join(s.strip() for s in summary)}")
    print(f"requests sent by schemathesis (access log): {len(fuzzed)}; 5xx: {sum(l['status'] >= 500 for l in fuzzed)}; "
          f"tracebacks in the server log: {text.count('Traceback')}")
    print(f"afterwards: POST /predict (real photo) -> {after.status_code}, width {after.json().get('width')}; "
          f"/health ready={health.get('ready')}; exit code after SIGTERM {exit_code}")
    print("\n| endpoint | method | status | requests |\n|---|---|---|---|")
    for (path, method, status), count in sorted(per_endpoint.items()):
        print(f"| {path} | {method} | {status} | {count} |")
    by_path = collections.Counter(path for path, _, _ in per_endpoint.elements())
    print("\nper endpoint:", ", ".join(f"{path} {count}" for path, count in sorted(by_path.items())))
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load_average": os.getloadavg(), "max_examples": args.max_examples, "seed": args.seed}))


if __name__ == "__main__":
    main()
