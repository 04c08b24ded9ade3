"""The README's first command, timed: `oilleak demo` on the CPU, with what it found.

Runs `python -m oilleak demo --device cpu` in a fresh output folder, and prints (and with --json writes) its
wall time and CPU time (on a loaded machine the wall time
is mostly waiting), the machine's load before and after, the val mask / box AP of the fine-tuned demo model, and the
instances and leak area shares its predictions found.

    python bench/bench_demo.py --threads 2 --json bench_out/demo_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="OMP/torch threads of the demo (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="oilleak-bench-demo-") as tmp:
        out = Path(tmp) / "demo"
        load_before = os.getloadavg()
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "oilleak", "demo", "--out", str(out), "--device", args.device],
                              env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # CPU time: what the wall time is on an idle machine
        load_after = os.getloadavg()
        if proc.returncode != 0:
            sys.exit(f"the demo failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        (report,) = (out / "test").glob("test-*/metrics.json")
        metrics = json.loads(report.read_text())["metrics"]
        with open(out / "predictions" / "summary.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        result = {
            "wall_s": round(seconds, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "device": args.device, "threads": args.threads,
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "load_avg_before": [round(x, 2) for x in load_before], "load_avg_after": [round(x, 2) for x in load_after],
            "segm_mAP": metrics.get("segm_mAP"), "bbox_mAP": metrics.get("bbox_mAP"),
            "segm_mAP_50": metrics.get("segm_mAP_50"),
            "predictions": rows,
            "last_lines": proc.stdout.strip().splitlines()[-6:],
        }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
