"""The bounded inference pool: worker threads take images from a short queue and run them through the model,
several at a time when batching is on.

Admission is decided when a request arrives: when ``queue`` images already wait, :meth:`InferencePool.submit`
raises :class:`QueueFull` (the app answers 503 with Retry-After) instead of letting work pile up. A worker
that takes an image waits up to ``batch_wait_s`` for more (up to ``max_batch``) and runs them as one padded
batch: on a GPU one batch of N costs far less than N single passes. Tiled images run alone, tile by tile.
Each image carries its request's score threshold; a batch computes masks for the detections at or above the
lowest threshold in it (the model's ``min_score``), since the answers drop the rest.

Shutdown (:meth:`InferencePool.cancel`, then :meth:`InferencePool.close`): the images still waiting fail
with :class:`ShuttingDown` (the app answers 503) and a tiled image stops before its next tile; the batch
inside the model finishes, since a model pass cannot be interrupted. ``close`` waits for the workers at
most its ``timeout``: they are daemon threads and do not hold the process.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from oilleak.predict.backends import Found

# Detector.predict_arrays: (images, min_score, tile, before_tile) -> each image's instances scoring min_score
# or more; with a tile size, each image in tiles, before_tile() called before every tile's pass
BatchPredict = Callable[[list[np.ndarray], float, "int | None", "Callable[[], None] | None"], list[Found]]


class QueueFull(Exception):
    """Every queue place is taken; the request should come back later."""


class ShuttingDown(QueueFull):
    """The server stops: the image was not run and will not be; another instance or a retry will."""


@dataclass
class _Job:
    image: np.ndarray
    tile: int | None
    min_score: float
    future: Future


class InferencePool:
    def __init__(self, predict: BatchPredict, *, workers: int, queue: int, max_batch: int, batch_wait_s: float):
        self.predict = predict
        self.queue_size = queue
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._waiting: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._cancelled = False
        self.running = 0  # images inside the model now
        self.batches = 0
        self.images = 0
        self._threads = [threading.Thread(target=self._work, name=f"oilleak-infer-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def full(self) -> bool:
        return len(self._waiting) >= self.queue_size

    def submit(self, images: list[np.ndarray], tile: int | None = None, min_score: float = 0.0) -> list[Future]:
        """Queue the images of one request together or not at all: refused (QueueFull) only when the queue is
        full. A request of several photos is taken whenever a place is free, and may fill the queue past its
        size: waiting for as many free places as it has photos starved /predict/batch under steady load of
        single photos (the soak in BENCHMARKS.md, "Reliability"); the pixel budget still bounds its memory."""
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"{len(self._waiting)} images are waiting (queue of {self.queue_size})")
            jobs = [_Job(image, tile, min_score, Future()) for image in images]
            self._waiting.extend(jobs)
            self._cond.notify(len(jobs))
        return [job.future for job in jobs]

    def cancel(self) -> int:
        """Take no more images, fail the waiting ones with ShuttingDown, stop tiled images between tiles;
        how many images were failed."""
        with self._cond:
            self._closed = self._cancelled = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in dropped:
            job.future.set_exception(ShuttingDown("the server is shutting down before this image's turn"))
        return len(dropped)

    def close(self, timeout: float | None = None) -> bool:
        """Finish what was queued, then stop the workers, waiting at most ``timeout`` seconds in all (None:
        as long as it takes); whether every worker has stopped."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _before_tile(self) -> None:
        if self._cancelled:
            raise ShuttingDown("the server is shutting down; this photo's tiles were not all run")

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._waiting:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._waiting.popleft()]
            if batch[0].tile is None and self.max_batch > 1:
                deadline = time.monotonic() + self.batch_wait_s
                while len(batch) < self.max_batch:
                    if self._waiting and self._waiting[0].tile is None:
                        batch.append(self._waiting.popleft())
                        continue
                    left = deadline - time.monotonic()
                    if self._waiting or left <= 0 or self._closed:  # a tiled job is next: run what we have
                        break
                    self._cond.wait(left)
            self.running += len(batch)
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            results: list | None = None
            error: Exception | None = None
            try:
                min_score = min(job.min_score for job in batch)
                results = self.predict([job.image for job in batch], min_score, batch[0].tile, self._before_tile)
            except Exception as exc:  # the request fails, the worker lives on
                error = exc
            finally:
                # the counts first: a client that got its answer and asks /health sees the pool as it is
                with self._cond:
                    self.running -= len(batch)
                    self.batches += 1
                    self.images += len(batch)
            for k, job in enumerate(batch):
                if error is not None:
                    job.future.set_exception(error)
                else:
                    job.future.set_result(results[k])
