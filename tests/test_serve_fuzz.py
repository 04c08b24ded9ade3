"""Schemathesis fuzzes the real `oilleak serve` (tiny checkpoint, 127.0.0.1, API key) from its OpenAPI schema:
every endpoint, with valid and invalid parameters, bodies and methods. No answer may be a 5xx, no traceback
may reach the log, and the server must answer a real photo normally afterwards. A short budget here
(--max-examples 6); bench/fuzz_serve.py runs the long one and prints the figures."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import httpx

from serve_process import ServerProcess, serve_ckpt  # noqa: F401 (a fixture)

KEY = "fuzz-key"


def test_schemathesis_finds_no_server_error_and_the_server_goes_on(serve_ckpt, sample_dir, tmp_path):
    server = ServerProcess(serve_ckpt, tmp_path / "server.log", "--queue", "4", api_key=KEY)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json", "--checks", "not_a_server_error",
             "--max-examples", "6", "--seed", "27", "--workers", "1", "--request-timeout", "60", "--no-color",
             "--generation-database", "none", "-H", f"X-API-Key: {KEY}", "-H", "X-Request-ID: fuzz"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

        lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
        fuzzed = [line for line in lines if line["request_id"] == "fuzz"]  # the requests schemathesis sent
        per_endpoint = collections.Counter((line["method"], line["path"]) for line in fuzzed)
        assert len(fuzzed) >= 100, per_endpoint
        for endpoint in (("POST", "/predict"), ("POST", "/predict/batch"), ("GET", "/health"), ("GET", "/classes")):
            assert per_endpoint[endpoint] >= 1, per_endpoint
        statuses = collections.Counter(line["status"] for line in fuzzed)
        assert all(0 < status < 500 for status in statuses), statuses
        assert {400, 405, 422} <= set(statuses)  # it did send broken requests, and they were refused as such
        assert "Traceback" not in server.log.read_text()

        with open(sorted(sample_dir.glob("*.jpg"))[0], "rb") as photo:
            after = httpx.post(server.url + "/predict", params={"score_thr": 0.99}, files={"image": ("p.jpg", photo)},
                               headers={"X-API-Key": KEY}, timeout=120)
        assert after.status_code == 200 and after.json()["width"] == 1130
        assert httpx.get(server.url + "/health").json()["ready"] is True
    finally:
        assert server.stop() in (0, -15)
