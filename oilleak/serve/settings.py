"""What `oilleak serve` is told on its command line, in one place the app, the pool and the tests read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    workers: int = 1  # inference threads, each running one batch at a time
    queue: int = 8  # images that may wait for a worker; one more is refused with 503
    max_batch: int = 1  # images run through the model together (1: no batching)
    batch_wait_ms: float = 10.0  # how long a worker waits for more images to fill a batch
    max_upload_mb: float = 20.0  # per image
    max_pixels: int = 50_000_000  # width x height; larger images are refused before their pixels are decoded
    max_images: int = 16  # per /predict/batch request
    api_key: str | None = None  # OILLEAK_API_KEY: required in X-API-Key by every /predict* and /classes call

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
