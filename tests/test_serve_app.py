"""The app in-process (Starlette's TestClient), with a stand-in model that fails: an exception inside a
request is answered as JSON 500 without its traceback, and the next requests are served; the CORS policy
when origins are configured (the default, none, is checked on the real server in test_serve.py)."""

from __future__ import annotations

import io
import logging
import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from oilleak.predict.detector import Detector
from oilleak.serve.app import create_app
from oilleak.serve.settings import ServeSettings


class BrokenBackend:
    """A Detector backend whose every pass fails."""

    classes, scale, score_thr, device, batched = ["oil"], (0, 0), 0.3, torch.device("cpu"), True

    def info(self) -> dict:
        return {"checkpoint": "x.pth", "classes": ["oil"]}

    def __call__(self, images, min_score=0.0):
        raise RuntimeError("something deep inside the model broke")


def BrokenModel() -> Detector:  # noqa: N802 (reads as the stand-in it builds)
    return Detector.from_backend(BrokenBackend())


def test_a_failing_request_is_json_500_and_the_server_goes_on(caplog):
    model = BrokenModel()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buffer, "PNG")
    with caplog.at_level(logging.INFO), TestClient(create_app(model, ServeSettings()), raise_server_exceptions=False) as client:
        response = client.post("/predict", files={"image": ("a.png", buffer.getvalue())})
        assert response.status_code == 500
        assert response.json() == {"error": "internal_error", "message": "the server failed on this request "
                                   "(RuntimeError); it is logged, the server goes on"}
        assert "Traceback" not in response.text and "something deep" not in response.text
        assert client.get("/health").json()["ready"] is True
        assert client.get("/classes").json()["classes"] == ["oil"]
    assert any("something deep inside" in r.getMessage() or (r.exc_info and "something deep" in str(r.exc_info[1]))
               for r in caplog.records)  # the traceback goes to the server's log
    assert any('"status": 500' in r.getMessage() for r in caplog.records)


def test_configured_origins_and_only_those_get_cors_headers():
    settings = ServeSettings(cors_origins=("https://dashboard.example",), api_key="k")
    with TestClient(create_app(BrokenModel(), settings)) as client:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-api-key"}
        allowed = client.options("/predict", headers={"Origin": "https://dashboard.example", **preflight})
        assert allowed.status_code == 200  # answered before the key check: a preflight carries no key
        assert allowed.headers["access-control-allow-origin"] == "https://dashboard.example"
        assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
        other = client.options("/predict", headers={"Origin": "https://elsewhere.example", **preflight})
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        read = client.get("/health", headers={"Origin": "https://dashboard.example"})
        assert read.headers["access-control-allow-origin"] == "https://dashboard.example"
        assert "x-request-id" in read.headers["access-control-expose-headers"].lower()
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://elsewhere.example"}).headers
