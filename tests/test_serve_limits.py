"""What one request, or many together, may cost `oilleak serve` (a real process on 127.0.0.1 serving the tiny
checkpoint): the pixel budget over every decoded-but-unanswered photo, the number of requests inside, the
model passes (tiles) of one request, the grace period after SIGTERM, and the warning for an address other
machines can reach without an API key."""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serve_process import REPO, SMALL_SCALE, ServerProcess, free_port, serve_ckpt  # noqa: F401 (a fixture)

FAST = {"score_thr": 0.99}  # no instance of the untrained model: a request costs its model passes only
# 2 MP in flight, 2 requests inside, 60 model passes a request
LIMITS = ["--pixel-budget-mp", "2", "--max-pixels", "2000000", "--max-requests", "2", "--max-passes", "60",
          "--queue", "8", "--workers", "1"]


def jpeg(photo: Path, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    with Image.open(photo) as im:
        im.convert("RGB").resize((width, height)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo(sample_dir) -> Path:
    return sorted(sample_dir.glob("*.jpg"))[0]


@pytest.fixture(scope="module")
def server(serve_ckpt, tmp_path_factory):
    process = ServerProcess(serve_ckpt, tmp_path_factory.mktemp("limits") / "server.log", *LIMITS)
    yield process
    process.stop()


def post(url: str, name: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(url + "/predict", params={**FAST, **params}, files={"image": (name, data)}, timeout=300)


def wait_running(url: str, images: int = 1) -> dict:
    deadline = time.monotonic() + 120
    while (health := httpx.get(url + "/health").json())["pool"]["running"] < images:
        assert time.monotonic() < deadline, health
        time.sleep(0.02)
    return health


def test_pixel_budget_and_request_limit_count_the_work_really_in_flight(server, photo):
    # 1400 x 1000 at tile=256: 7 x 5 = 35 model passes (stride 205), seconds of work holding 1.4 MP
    big, results = jpeg(photo, 1400, 1000), {}
    slow = threading.Thread(target=lambda: results.update(a=post(server.url, "a.jpg", big, tile=256)))
    slow.start()
    health = wait_running(server.url)
    assert health["megapixels_in_flight"] == 1.4 and health["pool"]["waiting"] == 0

    # 0.7 MP more would be 2.1 of 2: refused although the queue is empty (the queue alone would take it)
    refused = post(server.url, "b.jpg", jpeg(photo, 1000, 700))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "1.4 of the server's 2 megapixels in flight are taken and this request needs 0.7" in refused.json()["message"]

    # 0.12 MP fits: it waits behind the first, and two requests are inside, the limit
    queued = threading.Thread(target=lambda: results.update(d=post(server.url, "d.jpg", jpeg(photo, 400, 300), tile=256)))
    queued.start()
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health").json()["requests_inside"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    third = post(server.url, "e.jpg", jpeg(photo, 50, 50))
    assert third.status_code == 503 and "busy with 2 requests (--max-requests 2)" in third.json()["message"]

    slow.join(300)
    queued.join(300)
    assert results["a"].status_code == 200 and (results["a"].json()["width"], results["a"].json()["height"]) == (1400, 1000)
    assert results["d"].status_code == 200 and results["d"].json()["width"] == 400
    after = httpx.get(server.url + "/health").json()
    assert after["megapixels_in_flight"] == 0 and after["requests_inside"] == 0
    assert post(server.url, "e.jpg", jpeg(photo, 50, 50)).status_code == 200


def test_a_request_over_the_budget_or_the_passes_is_refused_naming_the_limit(server, photo):
    big = jpeg(photo, 1400, 1000)
    files = [("images", ("a.jpg", big)), ("images", ("b.jpg", jpeg(photo, 1000, 700)))]
    over = httpx.post(server.url + "/predict/batch", params=FAST, files=files, timeout=60)
    assert over.status_code == 413, over.text  # 2.1 MP could never fit in 2
    assert over.json()["message"].startswith("the photos of this request are 2.1 megapixels, over the server's "
                                             "budget of 2 megapixels in flight (--pixel-budget-mp)")
    # two photos of 35 passes each at tile=256; at tile=288 each is 6 x 5 = 30 (stride 230): 60 fit
    tiles = [("images", ("a.jpg", big)), ("images", ("c.jpg", big))]
    many = httpx.post(server.url + "/predict/batch", params={"tile": 256, **FAST}, files=tiles, timeout=60)
    assert many.status_code == 422 and many.json() == {"error": "invalid_request", "message": (
        "tile=256: 2 photos need 70 model passes, over the server's limit of 60 per request (--max-passes); "
        "use tile=288 or larger")}
    small_tile = post(server.url, "a.jpg", big, tile=128)
    assert small_tile.status_code == 422 and "tile" in small_tile.json()["message"] and "256" in small_tile.json()["message"]
    assert httpx.get(server.url + "/health").json()["megapixels_in_flight"] == 0


def test_sigterm_answers_what_the_grace_period_leaves_with_503_and_exits(serve_ckpt, photo, tmp_path):
    server = ServerProcess(serve_ckpt, tmp_path / "server.log", "--grace-s", "1", "--queue", "4")
    huge, results = jpeg(photo, 2000, 2000), {}  # at tile=256: 10 x 10 = 100 passes, far more than 1 s of work
    threads = [threading.Thread(target=lambda: results.update(tiled=post(server.url, "t.jpg", huge, tile=256))),
               threading.Thread(target=lambda: results.update(queued=post(server.url, "q.jpg", jpeg(photo, 300, 200))))]
    threads[0].start()
    wait_running(server.url)
    threads[1].start()
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health").json()["pool"]["waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    signalled = time.monotonic()
    server.process.send_signal(15)
    for thread in threads:
        thread.join(120)
    assert server.process.wait(60) in (0, -15)
    assert time.monotonic() - signalled < 15  # 1 s of grace, the tile running then, the answers
    for key, words in (("tiled", "tiles were not all run"), ("queued", "before this image's turn")):
        assert results[key].status_code == 503 and results[key].headers["Retry-After"] == "1"
        assert words in results[key].json()["message"], results[key].json()
    log = server.log.read_text()
    assert "Traceback" not in log and "Application shutdown complete" in log
    server.stop()


def test_a_reachable_address_without_a_key_is_warned_about(serve_ckpt, tmp_path):
    """0.0.0.0 on a port already taken: the warning is printed at start, then binding fails, so nothing is
    ever served to the network from a test."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", free_port()))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
        run = subprocess.run([sys.executable, "-m", "oilleak", "serve", str(serve_ckpt), "--host", "0.0.0.0",
                              "--port", str(port), "--device", "cpu", "--set", SMALL_SCALE],
                             capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert "WARNING: serving 0.0.0.0, reachable from other machines, without an API key" in out
    assert "OILLEAK_API_KEY" in out and run.returncode != 0
