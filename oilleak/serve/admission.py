"""What one request may cost before it runs: the pixels it holds decoded, and the model passes it needs.

:class:`PixelBudget` counts the pixels of every photo from the moment its header is read (before it is
decoded) until its answer is built, over all requests together; a request that does not fit now is refused
with 503 and Retry-After, one that could never fit with 413. :func:`passes` counts a request's model passes
(1 per photo, or its tiles with ``?tile=``) so :func:`too_many_passes` can refuse a request that would keep
a worker busy for minutes.
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator

from starlette.exceptions import HTTPException

from oilleak.predict.tiling import tile_windows

RETRY_AFTER_S = "1"
LARGEST_TILE = 8192
TILE_STEP = 32


class PixelBudget:
    """Pixels decoded or about to be, not yet answered. Used from the event loop's thread only."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if pixels > self.total:
            raise HTTPException(413, f"the photos of this request are {pixels / 1e6:.1f} megapixels, over the "
                                     f"server's budget of {self.total / 1e6:g} megapixels in flight "
                                     "(--pixel-budget-mp); send fewer or smaller photos per request")
        if self.used + pixels > self.total:
            raise HTTPException(503, f"busy: {self.used / 1e6:.1f} of the server's {self.total / 1e6:g} megapixels "
                                     f"in flight are taken and this request needs {pixels / 1e6:.1f}; retry shortly",
                                headers={"Retry-After": RETRY_AFTER_S})
        self.used += pixels
        try:
            yield
        finally:
            self.used -= pixels


def passes(sizes: list[tuple[int, int]], tile: int | None) -> int:
    """Model passes for photos of these (width, height) sizes: one each, or one per tile."""
    if tile is None:
        return len(sizes)
    return sum(len(tile_windows(height, width, tile)) for width, height in sizes)


def too_many_passes(sizes: list[tuple[int, int]], tile: int | None, limit: int) -> str | None:
    """Why the request costs too much (naming the parameter, the limit and the fix), or None."""
    needed = passes(sizes, tile)
    if needed <= limit:
        return None
    what = f"{len(sizes)} photos need" if len(sizes) > 1 else f"a {sizes[0][0]}x{sizes[0][1]} photo needs"
    if tile is None:
        return f"{what} {needed} model passes, over the server's limit of {limit} per request (--max-passes); send fewer photos"
    fits = next((t for t in range(tile + TILE_STEP, LARGEST_TILE + 1, TILE_STEP) if passes(sizes, t) <= limit), None)
    fix = f"use tile={fits} or larger" if fits is not None else "send fewer photos per request"
    return (f"tile={tile}: {what} {needed} model passes, over the server's limit of {limit} per request "
            f"(--max-passes); {fix}")
