"""`oilleak serve` as a real process on 127.0.0.1: every endpoint, every bad input, the API key, a burst
of concurrent requests against a short queue, and a graceful SIGTERM. The checkpoint is the tiny DetectoRS
of test_predict_model; the answers are checked against what `oilleak predict` writes for the same image."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from broken_images import corpus, png_claiming
from oilleak.predict.predictor import run_predict
from serve_process import CLASSES, SMALL_SCALE, ServerProcess, serve_ckpt  # noqa: F401 (a fixture)

KEY = "s3cret-key"
FAST = {"score_thr": 0.99}  # no instance of the untrained model: the request costs the model pass only
LIMITS = ["--queue", "4", "--workers", "1", "--max-upload-mb", "1", "--max-pixels", "4000000"]


@pytest.fixture(scope="module")
def ckpt(serve_ckpt):
    return serve_ckpt


@pytest.fixture(scope="module")
def photo(sample_dir, tmp_path_factory) -> Path:
    """A bundled BSData photo (JPEG, 1130 x 460), as a user would send it."""
    src = sorted(sample_dir.glob("*.jpg"))[0]
    return Path(shutil.copy(src, tmp_path_factory.mktemp("photo") / src.name))


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    process = ServerProcess(ckpt, tmp_path_factory.mktemp("server") / "server.log", *LIMITS, api_key=KEY)
    yield process
    assert process.stop() in (0, -15)  # uvicorn ends by re-raising the SIGTERM after its clean shutdown


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=120) as c:
        yield c


def upload(path: Path | None = None, data: bytes | None = None, name: str = "photo.jpg", field: str = "image"):
    return {field: (name, data if data is not None else path.read_bytes())}


def assert_error(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "message"} and body["message"]
    assert "Traceback" not in response.text
    for word in words:
        assert word in body["message"], body["message"]
    return body


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


# --- the endpoints -------------------------------------------------------------------------------------


def test_health_classes_schema_and_page(server, client):
    public = httpx.get(server.url + "/health")  # no key needed: load balancers poll it; it tells them no more
    assert public.status_code == 200 and set(public.json()) == {"ready", "status", "uptime_s"}
    assert public.json()["ready"] is True and public.json()["status"] == "ready" and public.json()["uptime_s"] >= 0
    assert httpx.get(server.url + "/health", headers={"X-API-Key": "wrong"}).json().keys() == public.json().keys()
    health = client.get("/health").json()  # with the key: what runs, and the queue
    assert health["device"] == "cpu" and health["classes"] == CLASSES and health["api_key_required"]
    assert health["model"]["preset"] == "detectors_htc_r50_tiny" and health["model"]["scale"] == [320, 192]
    assert health["pool"]["queue"] == 4 and health["pool"]["workers"] == 1
    assert client.get("/health").json()["requests_served"] > health["requests_served"]

    classes = client.get("/classes").json()
    assert classes["classes"] == CLASSES and all(c.startswith("#") and len(c) == 7 for c in classes["colours"])
    assert classes["model"]["checkpoint"] == "tiny.pth" and classes["model"]["score_thr"] == 0.3
    assert "/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 404  # Swagger UI would load its script from a CDN: no such page
    page = client.get("/")
    assert page.status_code == 200 and '<input id="files"' in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200
    assert_error(client.get("/no-such-page"), 404)


def test_predict_answers_what_oilleak_predict_writes(client, ckpt, photo, tmp_path):
    """The server's record equals instances/NAME.json of `oilleak predict` on the same photo (same model,
    scale and one thread, so the same floats): one schema, one computation."""
    # 0.6 keeps a few dozen of the untrained model's ~100 noisy instances: their outlines are the slow part
    answer = client.post("/predict", params={"score_thr": 0.6}, files=upload(photo, name=photo.name)).json()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_predict(ckpt, [str(photo)], out_dir=tmp_path / "pred", score_thr=0.6, device="cpu",
                             progress=False, overrides=[SMALL_SCALE])
    finally:
        torch.set_num_threads(threads)
    written = json.loads((report.out_dir / "instances" / f"{photo.stem}.json").read_text())
    assert answer["model"]["checkpoint"] == "tiny.pth" and answer["model"]["classes"] == CLASSES
    assert answer["source"] == photo.name
    assert {k: v for k, v in answer.items() if k not in ("model", "source")} == {k: v for k, v in written.items() if k != "source"}

    with Image.open(photo) as im:
        assert (answer["width"], answer["height"]) == im.size
    instances = answer["instances"]
    assert len(instances) > 5  # the untrained tiny model outlines many random regions
    for inst in instances:
        assert inst["class"] == CLASSES[inst["label"]] and 0 <= inst["score"] <= 1 and inst["polygons"]
        assert inst["area_share"] == pytest.approx(inst["area_px"] / (answer["width"] * answer["height"]))
    assert set(answer["leak_area_share_per_class"]) == set(CLASSES)
    assert max(answer["leak_area_share_per_class"].values()) <= answer["leak_area_share"] <= sum(answer["leak_area_share_per_class"].values()) + 1e-9

    scores = sorted({i["score"] for i in instances})
    middle = (scores[len(scores) // 2] + scores[len(scores) // 2 - 1]) / 2  # halfway: rounding cannot move a score past it
    filtered = client.post("/predict", params={"score_thr": middle}, files=upload(photo)).json()
    assert filtered["score_thr"] == middle
    assert [i["score"] for i in filtered["instances"]] == [i["score"] for i in instances if i["score"] >= middle]


def test_overlay_is_the_photo_with_the_leaks_drawn(client):
    image = np.full((192, 320, 3), 128, np.uint8)
    answer = client.post("/predict", params={"score_thr": 0.0, "overlay": True}, files=upload(data=png_bytes(image), name="grey.png")).json()
    overlay = np.array(Image.open(io.BytesIO(base64.b64decode(answer["overlay_png"]))))
    assert overlay.shape == image.shape
    assert (overlay != image).any(axis=2).mean() > 0.01 if answer["instances"] else (overlay == image).all()
    assert "overlay_png" not in client.post("/predict", files=upload(data=png_bytes(image), name="grey.png")).json()


def test_batch_answers_each_photo_and_names_the_bad_one(client, photo):
    files = [("images", ("a.jpg", photo.read_bytes())), ("images", ("broken.jpg", photo.read_bytes()[:3000])),
             ("images", ("grey.png", png_bytes(np.full((100, 150, 3), 90, np.uint8))))]
    body = client.post("/predict/batch", params={"score_thr": 0.65}, files=files).json()
    single = client.post("/predict", params={"score_thr": 0.65}, files=upload(photo, name="a.jpg")).json()
    assert body["model"]["classes"] == CLASSES
    first, broken, grey = body["results"]
    assert [i["score"] for i in first["instances"]] == pytest.approx([i["score"] for i in single["instances"]], abs=1e-4)
    assert {k: v for k, v in broken.items() if k != "message"} == {"source": "broken.jpg", "error": "bad_request", "status": 400}
    assert broken["message"].startswith("broken.jpg: the image is corrupt or truncated (")
    assert broken["message"].endswith("); send the whole file")
    assert (grey["width"], grey["height"]) == (150, 100)


# --- bad input ------------------------------------------------------------------------------------------


def test_api_key_is_required_except_for_health_and_the_page(server):
    for headers in ({}, {"X-API-Key": "wrong"}):
        assert_error(httpx.post(server.url + "/predict", files=upload(data=b"x"), headers=headers), 401, "X-API-Key")
        assert_error(httpx.get(server.url + "/classes", headers=headers), 401)
    assert httpx.get(server.url + "/health").status_code == 200 and httpx.get(server.url + "/").status_code == 200


def test_bad_uploads_get_json_errors_and_the_server_goes_on(client, photo):
    jpeg = photo.read_bytes()
    assert_error(client.post("/predict", files=upload(data=jpeg + b"\0" * (1024 * 1024), name="big.jpg")), 413, "MiB")
    assert_error(client.post("/predict", files=upload(data=b"just some text\n", name="notes.txt")), 415, "notes.txt")
    gif = io.BytesIO()
    Image.new("RGB", (20, 20)).save(gif, "GIF")
    assert_error(client.post("/predict", files=upload(data=gif.getvalue(), name="a.gif")), 415, "GIF")
    assert_error(client.post("/predict", files=upload(data=jpeg[: len(jpeg) // 2], name="cut.jpg")), 400, "truncated")
    assert_error(client.post("/predict", files=upload(data=b"", name="empty.jpg")), 400, "empty")
    assert_error(client.post("/predict", files={"image": (None, "/etc/passwd")}), 422)  # a path is a string, never read
    assert_error(client.post("/predict", data={"path": "/etc/passwd"}), 422, "image")
    assert_error(client.post("/predict", params={"score_thr": 2}, files=upload(photo)), 422, "score_thr")
    assert_error(client.post("/predict", params={"tile": 255}, files=upload(photo)), 422, "tile", "256")
    assert client.post("/predict", params=FAST, files=upload(photo)).status_code == 200


def test_every_broken_or_odd_image_gets_an_answer_or_a_clear_refusal(client):
    """The corpus of tests/broken_images.py, one by one and all in one batch: a broken file is refused with a
    4xx naming it, an odd valid one is predicted at its size (or refused as clearly: GIF is not taken)."""
    samples = corpus()
    for sample in samples:
        response = client.post("/predict", params=FAST, files=upload(data=sample.data, name=sample.name))
        assert response.status_code < 500 and "Traceback" not in response.text, (sample.name, response.text)
        if response.status_code == 200:
            assert sample.kind == "read", sample.name
            if sample.expect_size:
                assert (response.json()["width"], response.json()["height"]) == sample.expect_size, sample.name
        else:
            assert response.status_code in (400, 413, 415), (sample.name, response.text)
            assert response.json()["message"].startswith(f"{sample.name}: "), response.json()
            assert sample.kind == "refuse" or sample.name == "animated.gif", (sample.name, response.text)
    for half in (samples[:9], samples[9:]):  # at most 16 photos per request
        batch = client.post("/predict/batch", params=FAST, files=[("images", (s.name, s.data)) for s in half])
        assert batch.status_code == 200 and len(batch.json()["results"]) == len(half)
        for sample, result in zip(half, batch.json()["results"]):
            assert result["source"] == sample.name
            assert ("error" in result) == (sample.kind == "refuse" or sample.name == "animated.gif"), result


def test_decompression_bombs_are_refused_before_decoding(client, server):
    before = server.rss_mb()
    started = time.perf_counter()
    assert_error(client.post("/predict", files=upload(data=png_claiming(3000, 2000), name="bomb.png")), 413, "6000000 pixels")
    assert_error(client.post("/predict", files=upload(data=png_claiming(100_000, 100_000), name="huge.png")), 413, "pixels")
    assert time.perf_counter() - started < 10
    assert server.rss_mb() < before + 50  # 6 MP would be 18 MB decoded, 10^10 pixels 30 GB


def test_body_over_the_limit_without_content_length_is_cut_off(client):
    def chunks():
        boundary = b"--b0undary\r\n"
        yield boundary + b'Content-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
        for _ in range(40):  # 2.5 MiB, streamed (chunked): the server cannot know the size beforehand
            yield b"\xff" * 65536
        yield b"\r\n--b0undary--\r\n"
    response = client.post("/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    assert_error(response, 413, "too large")


# --- load -----------------------------------------------------------------------------------------------


def test_burst_is_answered_or_refused_and_nothing_is_lost(server, client, photo):
    small = png_bytes(np.array(Image.open(photo).convert("RGB").resize((320, 130))))
    for _ in range(2):
        assert client.post("/predict", params=FAST, files=upload(data=small, name="s.png")).status_code == 200
    rss_before = server.rss_mb()

    async def burst():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": KEY}, timeout=120, limits=limits) as ac:
            return await asyncio.gather(*(ac.post("/predict", params=FAST, files=upload(data=small, name=f"{k}.png")) for k in range(64)))

    started = time.perf_counter()
    responses = asyncio.run(burst())
    elapsed = time.perf_counter() - started
    statuses = [r.status_code for r in responses]
    assert len(responses) == 64 and set(statuses) <= {200, 503}, statuses
    assert 1 <= statuses.count(200) < 64 and statuses.count(503) > 0
    for r in responses:
        if r.status_code == 503:
            message = r.json()["message"]  # refused by the queue, or by the requests inside (--max-requests 32)
            assert r.headers["Retry-After"] == "1" and ("queue" in message or "(--max-requests 32)" in message), message
        else:
            assert r.json()["width"] == 320
    assert elapsed < 120

    health = client.get("/health").json()
    assert health["pool"]["waiting"] == 0 and health["pool"]["running"] == 0
    assert client.post("/predict", params=FAST, files=upload(data=small, name="after.png")).status_code == 200
    assert server.rss_mb() < rss_before + 150


def test_access_log_has_one_json_line_per_request_with_its_id(server, client):
    # its own refused upload: under pytest-xdist the tests that send one may run in another worker's server
    refused = client.post("/predict", files=upload(data=png_claiming(3000, 2000), name="bomb.png"),
                          headers={"X-Request-ID": "upload-413-check"})
    assert refused.status_code == 413 and refused.headers["X-Request-ID"] == "upload-413-check"  # echoed back
    made_up = client.get("/health").headers["X-Request-ID"]  # none sent: one is made up
    assert len(made_up) == 12 and int(made_up, 16) >= 0
    odd = client.get("/health", headers={"X-Request-ID": "a b;c"}).headers["X-Request-ID"]
    assert odd != "a b;c" and len(odd) == 12  # not a safe id to log as is: replaced
    time.sleep(0.2)
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    assert {"time", "request_id", "client", "method", "path", "status", "duration_ms"} <= set(lines[-1])
    assert {"path": "/predict", "status": 413} == {k: v for k, v in next(
        line for line in lines if line["request_id"] == "upload-413-check").items() if k in ("path", "status")}
    assert any(line["request_id"] == made_up and line["path"] == "/health" for line in lines)
    assert "Traceback" not in server.log.read_text()
    assert "WARNING" not in server.log.read_text()  # 127.0.0.1 with a key: nothing to warn about


def test_no_cors_headers_by_default(server, client):
    """Same origin only: a page elsewhere gets no Access-Control-Allow-Origin, so its browser refuses to read."""
    origin = {"Origin": "http://elsewhere.example"}
    assert "access-control-allow-origin" not in client.get("/classes", headers=origin).headers
    preflight = httpx.options(server.url + "/predict", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_sigterm_answers_the_request_in_flight_and_refuses_new_ones(ckpt, photo, tmp_path):
    server = ServerProcess(ckpt, tmp_path / "server.log", "--queue", "2")
    results = {}

    def slow_request():  # tiled: 12 model passes (6 x 2 tiles of 256), seconds of work
        results["slow"] = httpx.post(server.url + "/predict", params={"tile": 256, **FAST}, files=upload(photo), timeout=120)

    thread = threading.Thread(target=slow_request)
    thread.start()
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health").json()["pool"]["running"] == 0 and time.monotonic() < deadline:  # no key: all shown
        time.sleep(0.05)
    server.process.send_signal(15)
    time.sleep(0.3)
    try:
        late = httpx.post(server.url + "/predict", files=upload(photo), timeout=30)
        assert_error(late, 503, "shutting down")
    except httpx.TransportError:
        pass  # the listening socket is already closed: refused as well
    thread.join(120)
    assert results["slow"].status_code == 200 and results["slow"].json()["width"] == 1130
    assert server.process.wait(60) in (0, -15)
    assert "Application shutdown complete" in server.log.read_text()
    server.stop()
