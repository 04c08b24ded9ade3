"""The app in-process (Starlette's TestClient), with a stand-in model that fails: an exception inside a
request is answered as JSON 500 without its traceback, and the next requests are served."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from oilleak.serve.app import create_app
from oilleak.serve.settings import ServeSettings


class BrokenModel:
    classes = ["oil"]
    info = {"checkpoint": "x.pth", "classes": ["oil"]}
    device = "cpu"
    config = SimpleNamespace(predict=SimpleNamespace(score_thr=0.3))
    score_thr = 0.3

    def __call__(self, images, min_score=0.0):
        raise RuntimeError("something deep inside the model broke")


def test_a_failing_request_is_json_500_and_the_server_goes_on(caplog):
    model = BrokenModel()
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buffer, "PNG")
    with caplog.at_level(logging.INFO), TestClient(create_app(model, ServeSettings()), raise_server_exceptions=False) as client:
        response = client.post("/predict", files={"image": ("a.png", buffer.getvalue())})
        assert response.status_code == 500
        assert response.json() == {"error": "internal_error", "message": response.json()["message"]}
        assert "RuntimeError" in response.json()["message"] and "Traceback" not in response.text
        assert client.get("/health").json()["ready"] is True
        assert client.get("/classes").json()["classes"] == ["oil"]
    assert any("something deep inside" in r.getMessage() or (r.exc_info and "something deep" in str(r.exc_info[1]))
               for r in caplog.records)  # the traceback goes to the server's log
    assert any('"status": 500' in r.getMessage() for r in caplog.records)
