"""A bounded soak of `oilleak serve` on 127.0.0.1: N closed-loop clients (asyncio + httpx, one connection
each, a random pause of 0 to 2 x --think-ms between requests) send a seeded mix of valid, invalid and
oversized requests for a set time (and at most a set count), and SIGTERM reaches the server in the middle
of the load. Reported: requests by kind and status, none hung
(no client timeout) or lost (every request sent before the SIGTERM answered; after it, an answer or a
refused connection), p50/p99 latency of the answered ones, the server's RSS at start, peak and end (sampled
every 0.5 s), the grace period's outcome and the exit code.

The checkpoint is an untrained tiny DetectoRS (bench_serve.make_checkpoint) served at a 320x192 scale on
the CPU, with an API key, `--queue 8 --max-upload-mb 2 --max-pixels 4000000 --max-passes 40 --grace-s 10`.

    .venv/bin/python bench/soak_serve.py --clients 16 --seconds 240 --sigterm-at 180 --think-ms 250 --max-requests 200000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench_serve import PHOTO, make_checkpoint, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from broken_images import corpus, png_claiming  # noqa: E402 (the corpus lives with the tests)

KEY = "soak-key"
SERVER_OPTIONS = ["--device", "cpu", "--set", "data.scale=[320,192]", "--queue", "8", "--workers", "1",
                  "--max-upload-mb", "2", "--max-pixels", "4000000", "--max-passes", "40", "--grace-s", "10"]


def jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    with Image.open(PHOTO) as im:
        im.convert("RGB").resize((width, height)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@dataclass
class Outcome:
    kind: str
    status: str  # the HTTP status, or the transport error's name
    seconds: float
    sent_at: float  # seconds since the start
    after_sigterm: bool


def request_kinds() -> dict[str, tuple[float, dict]]:
    """kind -> (weight, httpx.request keyword arguments)."""
    photo, small = PHOTO.read_bytes(), jpeg(320, 130)
    broken = {s.name: s.data for s in corpus()}
    fast = {"score_thr": 0.99}  # the untrained model's outlines would dominate the cost and say nothing
    post = lambda files, params=fast, path="/predict", headers=None: {  # noqa: E731
        "method": "POST", "url": path, "params": params, "files": files, **({"headers": headers} if headers else {})}
    return {
        "valid photo": (30, post({"image": (PHOTO.name, photo)})),
        "valid small": (15, post({"image": ("small.jpg", small)})),
        "valid batch of 3": (5, post([("images", (f"{k}.jpg", small)) for k in range(3)], path="/predict/batch")),
        "valid overlay": (3, post({"image": ("small.jpg", small)}, params={**fast, "overlay": "true"})),
        "health": (5, {"method": "GET", "url": "/health"}),
        "classes": (3, {"method": "GET", "url": "/classes"}),
        "invalid: truncated jpeg": (5, post({"image": ("truncated.jpg", broken["truncated.jpg"])})),
        "invalid: text": (4, post({"image": ("notes.jpg", broken["text.jpg"])})),
        "invalid: gif": (2, post({"image": ("a.gif", broken["animated.gif"])})),
        "invalid: score_thr=5": (3, post({"image": ("small.jpg", small)}, params={"score_thr": 5})),
        "invalid: no image field": (3, {"method": "POST", "url": "/predict", "data": {"path": "/etc/passwd"}}),
        "invalid: no key": (3, post({"image": ("small.jpg", small)}, headers={"X-API-Key": "wrong"})),
        "oversized: 3 MiB file": (4, post({"image": ("big.jpg", photo + b"\0" * (3 << 20))})),
        "oversized: 65535x65535 header": (4, post({"image": ("bomb.png", png_claiming(65535, 65535))})),
        "oversized: 17 photos": (2, post([("images", (f"{k}.jpg", small)) for k in range(17)], path="/predict/batch")),
        "oversized: tile=256 passes": (3, post({"image": ("tiles.jpg", jpeg(2000, 1800))}, params={**fast, "tile": 256})),
        "oversized: tile=64": (2, post({"image": ("small.jpg", small)}, params={**fast, "tile": 64})),
    }


async def client(url: str, kinds: dict, rng: random.Random, deadline: float, budget: list[int], started: float,
                 signalled: list[float], outcomes: list[Outcome], think_s: float) -> None:
    names = list(kinds)
    weights = [kinds[name][0] for name in names]
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": KEY}, timeout=120, limits=limits) as session:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            kind = rng.choices(names, weights)[0]
            sent = time.monotonic()
            after = bool(signalled)
            try:
                response = await session.request(**kinds[kind][1])
                status = str(response.status_code)
            except httpx.TransportError as exc:  # a refused connection after the SIGTERM; anything else is lost
                status = type(exc).__name__
                await asyncio.sleep(0.2)
            outcomes.append(Outcome(kind, status, time.monotonic() - sent, sent - started, after))
            await asyncio.sleep(rng.uniform(0, 2 * think_s))  # a user between two photos


async def sample_rss(pid: int, until: list[bool], samples: list[tuple[float, float]], started: float) -> None:
    while not until:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append((time.monotonic() - started, int(line.split()[1]) / 1024))
        except FileNotFoundError:
            return
        await asyncio.sleep(0.5)


async def soak(url: str, process, args) -> dict:
    kinds = request_kinds()
    outcomes: list[Outcome] = []
    samples: list[tuple[float, float]] = []
    signalled: list[float] = []
    done: list[bool] = []
    started = time.monotonic()
    deadline, budget = started + args.seconds, [args.max_requests]
    sampler = asyncio.create_task(sample_rss(process.pid, done, samples, started))

    exited: list[float] = []

    async def terminate(after_s: float) -> None:
        await asyncio.sleep(after_s)
        signalled.append(time.monotonic() - started)
        process.send_signal(signal.SIGTERM)
        while process.poll() is None and time.monotonic() - started < signalled[0] + 120:
            await asyncio.sleep(0.05)
        exited.append(time.monotonic() - started)

    killer = asyncio.create_task(terminate(args.sigterm_at))
    await asyncio.gather(*(client(url, kinds, random.Random(args.seed + k), deadline, budget, started, signalled, outcomes,
                                  args.think_ms / 1000) for k in range(args.clients)))
    if not signalled:  # the count bound ended the load first: the SIGTERM comes now, after it
        killer.cancel()
        killer = asyncio.create_task(terminate(0))
    await killer
    exit_code = process.poll()
    done.append(True)
    await sampler
    return {"outcomes": outcomes, "rss": samples, "sigterm_s": signalled[0] if signalled else None,
            "exit_s": exited[0], "exit_code": exit_code}


def report(result: dict, args, log: str) -> None:
    outcomes: list[Outcome] = result["outcomes"]
    sigterm = result["sigterm_s"]
    before = [o for o in outcomes if not o.after_sigterm]
    after = [o for o in outcomes if o.after_sigterm]
    in_flight = [o for o in before if sigterm is not None and o.sent_at + o.seconds > sigterm]
    lost = [o for o in before if not o.status.isdigit()]  # sent before the SIGTERM, no answer
    hung = [o for o in outcomes if o.status in ("ReadTimeout", "WriteTimeout", "PoolTimeout", "ConnectTimeout")]
    print(f"{len(outcomes)} requests from {args.clients} clients in {args.seconds} s (at most {args.max_requests}); "
          f"SIGTERM at {sigterm:.1f} s, server exited at {result['exit_s']:.1f} s with {result['exit_code']}")
    print(f"hung (client timeout of 120 s): {len(hung)}; lost (sent before the SIGTERM, no answer): {len(lost)}")
    print(f"in flight at the SIGTERM: {len(in_flight)}, answered " +
          ", ".join(f"{s}: {n}" for s, n in sorted(collections.Counter(o.status for o in in_flight).items())))
    print("after the SIGTERM: " + ", ".join(f"{s}: {n}" for s, n in sorted(collections.Counter(o.status for o in after).items())))

    print("\n| kind | requests (before SIGTERM) | statuses | p50 ms | p99 ms |\n|---|---|---|---|---|")
    by_kind = collections.defaultdict(list)
    for o in before:
        by_kind[o.kind].append(o)
    for kind in sorted(by_kind):
        group = by_kind[kind]
        ms = np.array([o.seconds for o in group]) * 1000
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(collections.Counter(o.status for o in group).items()))
        print(f"| {kind} | {len(group)} | {statuses} | {np.percentile(ms, 50):.0f} | {np.percentile(ms, 99):.0f} |")
    answered = np.array([o.seconds for o in before if o.status.isdigit()]) * 1000
    ok = np.array([o.seconds for o in before if o.status == "200"]) * 1000
    totals = collections.Counter(o.status for o in before)
    print(f"\nbefore the SIGTERM, by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(totals.items())))
    print(f"latency, every answer: p50 {np.percentile(answered, 50):.0f} ms, p99 {np.percentile(answered, 99):.0f} ms; "
          f"200s only: p50 {np.percentile(ok, 50):.0f} ms, p99 {np.percentile(ok, 99):.0f} ms")
    rss = result["rss"]
    pre = [mb for t, mb in rss if sigterm is None or t < sigterm]
    thirds = [pre[len(pre) // 3], pre[2 * len(pre) // 3], pre[-1]]
    print(f"server RSS: start {rss[0][1]:.0f} MB, peak {max(mb for _, mb in rss):.0f} MB, at 1/3 {thirds[0]:.0f} MB, "
          f"2/3 {thirds[1]:.0f} MB, end (just before the SIGTERM) {thirds[2]:.0f} MB")
    print(f"tracebacks in the server log: {log.count('Traceback')}; 5xx other than 503: "
          f"{sum(o.status.isdigit() and int(o.status) >= 500 and o.status != '503' for o in outcomes)}")
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                      "load_average_after": os.getloadavg(), "server": SERVER_OPTIONS, "seed": args.seed}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=240, help="the clients stop sending after this")
    parser.add_argument("--sigterm-at", type=float, default=180, help="seconds into the run")
    parser.add_argument("--max-requests", type=int, default=200_000, help="the clients stop after this many in all")
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--think-ms", type=float, default=250, help="each client waits 0..2x this between requests")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = make_checkpoint("detectors_htc_r50_tiny", work)
        log = work / "server.log"
        process, url = start_server(ckpt, log, *SERVER_OPTIONS, api_key=KEY)
        try:
            result = asyncio.run(soak(url, process, args))
        finally:
            if process.poll() is None:
                process.kill()
        if args.log:
            args.log.write_text(log.read_text())
        report(result, args, log.read_text())


if __name__ == "__main__":
    main()
