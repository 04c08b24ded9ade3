"""The inference pool of `oilleak serve`: admission (queue full -> QueueFull), batching within the wait window
and up to max_batch, each answer going to its own request, a failing batch failing only its requests, and
the real model giving the same instances for a photo in a batch as alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from oilleak.data.transforms import load_image
from oilleak.predict.backends import Found
from oilleak.predict.detector import Detector
from oilleak.predict.instances import Instance
from oilleak.serve.pool import InferencePool, QueueFull, ShuttingDown
from serve_process import SMALL_SCALE, serve_ckpt  # noqa: F401 (a fixture)


class Recorder:
    """A stand-in model (a Detector backend): one instance per image whose score is the image's first pixel /
    255; it can be held (to fill the queue) and made to fail. ``predict`` is what the service hands the pool:
    the Detector's predict_arrays over it (tiling included)."""

    classes, scale, score_thr, device, batched = ["leak"], (0, 0), 0.3, torch.device("cpu"), True

    def info(self) -> dict:
        return {"checkpoint": "recorder"}

    def __init__(self):
        self.predict = Detector.from_backend(self).predict_arrays
        self.batches: list[int] = []
        self.min_scores: list[float] = []
        self.release = threading.Event()
        self.release.set()
        self.fail = False

    def __call__(self, images, min_score=0.0):
        self.release.wait(10)
        self.batches.append(len(images))
        self.min_scores.append(min_score)
        if self.fail:
            raise RuntimeError("CUDA out of memory (pretend)")
        return [Found([Instance(0, float(im[0, 0, 0]) / 255, (0, 0, 1, 1), np.ones((1, 1), bool), (0, 0))], None) for im in images]


def image(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def test_batches_form_within_the_window_and_answers_reach_their_requests():
    model = Recorder()
    model.release.clear()  # the worker holds the first image while the others queue up
    pool = InferencePool(model.predict, workers=1, queue=8, max_batch=3, batch_wait_s=0.2)
    try:
        thresholds = [0.3, 0.5, 0.2, 0.9, 0.4, 0.6, 0.7]
        futures = [f for v, thr in enumerate(thresholds) for f in pool.submit([image(v * 30)], min_score=thr)]
        time.sleep(0.1)
        model.release.set()
        scores = [f.result(10).instances[0].score for f in futures]
        assert scores == pytest.approx([v * 30 / 255 for v in range(7)])
        assert model.batches == [3, 3, 1]  # the first image waited for two more, up to max_batch
        assert model.min_scores == [0.2, 0.4, 0.7]  # each batch keeps what its least demanding request shows
    finally:
        pool.close()


def test_a_full_queue_refuses_and_a_failing_batch_fails_only_its_requests():
    model = Recorder()
    model.release.clear()
    pool = InferencePool(model.predict, workers=1, queue=2, max_batch=1, batch_wait_s=0)
    try:
        running = pool.submit([image(1)])
        time.sleep(0.1)  # the worker holds it; two more fill the queue
        waiting = pool.submit([image(2)]) + pool.submit([image(3)])
        assert pool.full()
        with pytest.raises(QueueFull, match="queue of 2"):
            pool.submit([image(4)])
        model.fail = True
        model.release.set()
        with pytest.raises(RuntimeError, match="pretend"):
            running[0].result(10)
        for f in waiting:
            with pytest.raises(RuntimeError):
                f.result(10)
        model.fail = False
        (after,) = pool.submit([image(255)])
        assert after.result(10).instances[0].score == 1.0  # the worker lived on
        assert pool.submit([image(1)] * 5)[4].result(10)  # a request larger than the queue, taken when it is empty
        model.release.clear()
        pool.submit([image(5)])  # the worker holds it
        time.sleep(0.1)
        pool.submit([image(6)])  # 1 of 2 places taken: a request of 3 photos still gets in
        three = pool.submit([image(7)] * 3)
        assert pool.waiting == 4 and pool.full()
        with pytest.raises(QueueFull, match="queue of 2"):
            pool.submit([image(8)])
        model.release.set()
        assert [f.result(10).instances[0].score for f in three] == pytest.approx([7 / 255] * 3)
    finally:
        pool.close()


def test_a_tiled_image_runs_alone_tile_by_tile():
    model = Recorder()
    pool = InferencePool(model.predict, workers=1, queue=4, max_batch=4, batch_wait_s=0.05)
    try:
        (tiled,) = pool.submit([image(60, size=300)], tile=128)
        assert tiled.result(10) and set(model.batches) == {1} and len(model.batches) == 9  # 3 x 3 tiles
    finally:
        pool.close()


def test_cancel_fails_the_waiting_and_close_does_not_wait_forever():
    model = Recorder()
    model.release.clear()  # a model pass that does not end (until released below)
    pool = InferencePool(model.predict, workers=1, queue=4, max_batch=1, batch_wait_s=0)
    (inside,) = pool.submit([image(10)])
    time.sleep(0.1)
    waiting = pool.submit([image(20)]) + pool.submit([image(30)])
    assert pool.cancel() == 2
    for future in waiting:
        with pytest.raises(ShuttingDown, match="before this image's turn"):
            future.result(1)
    with pytest.raises(ShuttingDown):
        pool.submit([image(40)])
    started = time.monotonic()
    assert pool.close(timeout=0.5) is False  # the worker is still inside the model: reported, not joined forever
    assert 0.4 < time.monotonic() - started < 2
    model.release.set()
    assert inside.result(10).instances[0].score == pytest.approx(10 / 255)  # the pass that had begun still answers
    assert pool.close(timeout=5) is True


def test_cancel_stops_a_tiled_image_between_tiles():
    model = Recorder()
    pool = InferencePool(model.predict, workers=1, queue=4, max_batch=1, batch_wait_s=0)
    try:
        model.release.clear()
        (tiled,) = pool.submit([image(60, size=600)], tile=128)  # 6 x 6 tiles
        time.sleep(0.1)  # the worker is inside the first tile
        pool.cancel()
        model.release.set()
        with pytest.raises(ShuttingDown, match="tiles were not all run"):
            tiled.result(10)
        assert len(model.batches) == 1  # the tile that had begun, none after it
    finally:
        pool.close(timeout=5)


def test_the_model_gives_a_photo_the_same_instances_in_a_batch_as_alone(serve_ckpt, sample_dir):
    model = Detector(serve_ckpt, "cpu", overrides=[SMALL_SCALE])
    photos = [load_image(p) for p in sorted(sample_dir.glob("*.jpg"))[:2]]
    photos = [np.ascontiguousarray(p[: min(p.shape[0] for p in photos), : min(p.shape[1] for p in photos)]) for p in photos]
    batched = model.predict_arrays(photos, 0.0)  # what the pool runs
    for photo, together in zip(photos, batched):
        (alone,) = model.predict_arrays([photo], 0.0)
        together, alone = together.instances, alone.instances
        assert len(together) == len(alone) > 0
        assert [i.score for i in together] == pytest.approx([i.score for i in alone], abs=1e-4)
        assert [i.label for i in together] == [i.label for i in alone]
