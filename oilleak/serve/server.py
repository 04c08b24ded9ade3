"""`oilleak serve`: load the checkpoint once, warm the model up, serve with uvicorn.

SIGTERM (or Ctrl-C) stops the server gracefully: /health turns "draining" (503), new /predict calls are
refused with 503 and uvicorn stops accepting connections. The requests in flight are answered if their work
is done within the grace period (``--grace-s``); when it ends, the images still waiting for a worker (and
tiled photos, before their next tile) are answered 503, the model pass running then finishes, and uvicorn
waits :data:`ANSWER_MARGIN_S` more for those last answers before it closes what is left. Then the
inference pool stops and the process exits.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path

import numpy as np
import uvicorn

from oilleak.serve.app import create_app
from oilleak.predict.detector import Detector
from oilleak.serve.settings import ServeSettings


ANSWER_MARGIN_S = 10.0  # after the grace period: time for the 503s and the last model pass to go out
CONNECTIONS_OVER_REQUESTS = 64  # uvicorn's own limit (plain-text 503) sits this far above --max-requests


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


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
    model = Detector(ckpt, device, overrides=overrides)
    model.predict_arrays([np.zeros((64, 64, 3), np.uint8)], 0.0)  # the first pass allocates and tunes; no request should pay for it
    app = create_app(model, settings)
    _log_json_lines()
    state = app.state.oilleak

    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info", lifespan="on",
                            timeout_graceful_shutdown=settings.grace_s + ANSWER_MARGIN_S,
                            limit_concurrency=settings.max_requests + CONNECTIONS_OVER_REQUESTS)
    if not is_loopback(host) and not settings.api_key:
        on_ready(f"WARNING: serving {host}, reachable from other machines, without an API key: anyone who can "
                 "reach the port can run the model. Set OILLEAK_API_KEY, or serve --host 127.0.0.1 behind a proxy.")
    on_ready(f"oilleak serve: {model.info['checkpoint']} ({model.info['preset']}, {len(model.classes)} classes) on "
             f"{model.device}, http://{host}:{port}/ (API schema at /openapi.json)")
    DrainingServer(config, state.begin_shutdown).run()
