"""`oilleak serve` as a real process on 127.0.0.1 and a free port, for the server and page tests: the tiny
DetectoRS checkpoint of test_predict_model, run at a small scale so a CPU request takes well under a second."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL_SCALE = "data.scale=[320,192]"
CLASSES = ["sly_bjbmyw", "sly_dmyw"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, ckpt: Path, log: Path, *args: str, api_key: str | None = None, start_timeout: float = 180,
                 small_scale: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        env.pop("OILLEAK_API_KEY", None)
        if api_key:
            env["OILLEAK_API_KEY"] = api_key
        command = [sys.executable, "-m", "oilleak", "serve", str(ckpt), "--port", str(self.port), "--device", "cpu",
                   *(["--set", SMALL_SCALE] if small_scale else []), *args]
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"oilleak serve exited with {self.process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"oilleak serve did not answer within {start_timeout} s:\n{log.read_text()}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode


def tiny_served_checkpoint(path: Path) -> Path:
    """An untrained tiny DetectoRS (BatchNorm statistics from two sample photos), as test_predict_model's
    tiny_checkpoint makes it, built here from the model modules alone so that the server tests do not
    depend on the predict tests' imports."""
    import torch

    from oilleak.config import config_from_dict
    from oilleak.data.transforms import load_image, pad_batch, prepare_image
    from oilleak.models.checkpoint import save_checkpoint
    from oilleak.models.presets import build_model
    from oilleak.train.from_scratch import calibrate_frozen_batchnorm

    scale = (512, 320)
    config = config_from_dict({"data": {"data_root": "data", "classes": CLASSES, "scale": list(scale), "workers": 0},
                               "model": {"preset": "detectors_htc_r50_tiny"}})
    torch.manual_seed(0)
    model = build_model(config.model, len(CLASSES))
    photos = sorted((REPO / "sample" / "bsdata").glob("*.jpg"))[:2]
    calibrate_frozen_batchnorm(model, [pad_batch([prepare_image(load_image(p), scale)[0]])[0] for p in photos])
    save_checkpoint(path, model=model, config=config)
    return path


@pytest.fixture(scope="session")
def serve_ckpt(tmp_path_factory) -> Path:
    """The tiny checkpoint the server test modules serve (made once per test process)."""
    return tiny_served_checkpoint(tmp_path_factory.mktemp("serve_ckpt") / "tiny.pth")
