"""Ctrl-C and SIGTERM end training at the next step boundary, after a resumable checkpoint is saved.

The first signal only sets a flag that the loop reads once per step (and shares with the other ranks);
a second Ctrl-C raises KeyboardInterrupt at once for a user who does not want to wait.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopSignals:
    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
