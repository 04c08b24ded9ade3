"""What `oilleak serve` is told on its command line, in one place the app, the pool and the tests read."""

from __future__ import annotations

from dataclasses import dataclass

from oilleak.errors import OilleakError

MIN_TILE = 256  # `?tile=` below this multiplies the model passes of a photo for little gain


@dataclass(frozen=True)
class ServeSettings:
    workers: int = 1  # inference threads, each running one batch at a time
    queue: int = 8  # images that may wait for a worker; one more is refused with 503
    max_batch: int = 1  # images run through the model together (1: no batching)
    batch_wait_ms: float = 10.0  # how long a worker waits for more images to fill a batch
    max_upload_mb: float = 20.0  # per image
    max_pixels: int = 50_000_000  # width x height; larger images are refused before their pixels are decoded
    max_images: int = 16  # per /predict/batch request
    pixel_budget_mp: float = 200.0  # megapixels decoded and not yet answered, all requests together (503 beyond)
    max_requests: int = 32  # /predict* requests inside the server at once (503 beyond)
    max_passes: int = 100  # model passes one request may cost: 1 per photo, or its tiles with ?tile= (422 beyond)
    grace_s: float = 30.0  # after SIGTERM: how long the work in flight may take before the rest is answered 503
    cors_origins: tuple[str, ...] = ()  # origins whose pages may call the API (none: same origin only)
    api_key: str | None = None  # OILLEAK_API_KEY: required in X-API-Key by every /predict* and /classes call

    def __post_init__(self) -> None:
        if self.pixel_budget < self.max_pixels:
            raise OilleakError(f"--pixel-budget-mp {self.pixel_budget_mp:g} is below one photo of --max-pixels "
                               f"{self.max_pixels}: no such photo could ever be served; raise it to at least "
                               f"{self.max_pixels / 1e6:g}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def pixel_budget(self) -> int:
        return int(self.pixel_budget_mp * 1_000_000)
