"""`oilleak serve`: load the checkpoint once, warm the model up, serve with uvicorn.

SIGTERM (or Ctrl-C) stops the server gracefully: /health turns "draining" (503), new /predict calls are
refused with 503 and uvicorn stops accepting connections, the requests in flight are answered, then the
inference pool stops and the process exits 0.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import uvicorn

from oilleak.serve.app import create_app
from oilleak.serve.model import ServedModel
from oilleak.serve.settings import ServeSettings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which also tells the app to refuse new work as soon as the stop signal comes."""

    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)


def _log_json_lines() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))  # each access line is already a JSON object
    for name in ("oilleak.serve.access", "oilleak.serve"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def run_server(ckpt: Path, *, host: str, port: int, device, settings: ServeSettings,
               overrides: list[str] | None = None, on_ready=print) -> None:
    model = ServedModel.load(ckpt, device, overrides)
    model([np.zeros((64, 64, 3), np.uint8)])  # the first pass allocates and tunes; no request should pay for it
    app = create_app(model, settings)
    _log_json_lines()
    state = app.state.oilleak

    def drain() -> None:
        state.draining = True

    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=120, lifespan="on")
    on_ready(f"oilleak serve: {model.checkpoint} ({model.preset}, {len(model.classes)} classes) on "
             f"{model.device}, http://{host}:{port}/ (API docs at /docs)")
    DrainingServer(config, drain).run()
