"""oilleak from Python: ``Detector(path)(photos)`` -> one :class:`~oilleak.predict.result.Result` per image.

    from oilleak import Detector
    det = Detector("best.pth")                    # or an mmdetection checkpoint, or an `oilleak export` .onnx
    for result in det.stream("photos/**/*.jpg"):  # a generator: one image in memory at a time
        print(result.source, [(leak.class_name, round(leak.score, 2)) for leak in result])

`oilleak predict`, `oilleak serve` and the demo run through this class: there is one inference path.
Images are decoded in a background thread while the model runs; on a GPU they are batched.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from oilleak.errors import OilleakError
from oilleak.predict.backends import Backend, Found, load_backend
from oilleak.predict.instances import Instance, fill_holes
from oilleak.predict.result import Result
from oilleak.predict.tiling import predict_tiled
from oilleak.predict.video import is_video, read_frames

ImageLike = Union[str, Path, np.ndarray, Any]  # a path, folder, glob or video; an RGB array; a PIL image
GPU_BATCH = 4  # images per forward pass on a GPU unless batch_size says otherwise


@dataclass
class _Item:
    """One image to predict, decoded or the reason it could not be."""

    source: str
    image: np.ndarray | None
    error: str | None = None
    frame: int | None = None
    time_s: float | None = None


class Detector:
    """A model loaded once, to run on images, folders, globs, arrays, PIL images and videos.

    ``path``: an oilleak checkpoint (``best.pth``), an mmdetection checkpoint (its classes from the file, or
    ``classes=[...]`` in its label order; ``preset`` its model, ``detectors_htc_r50`` by default) or an
    `oilleak export` ``.onnx`` file (run by ONNX Runtime on the CPU). ``device``: "cpu", "cuda", "cuda:1"...;
    None takes the GPU when there is one. ``score_thr``: the lowest score kept (None: the checkpoint's).
    ``tile``: predict images larger than this many pixels in overlapping tiles (`oilleak predict --tile`).
    ``overrides``: ``--set`` values for a checkpoint's stored config, e.g. ``["model.mask_merge=last"]``.
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None, score_thr: float | None = None, *,
                 classes: list[str] | None = None, preset: str | None = None, tile: int | None = None,
                 batch_size: int | None = None, overrides: list[str] | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() and not str(path).lower().endswith(".onnx") else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise OilleakError(f"device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise OilleakError(f"device {device!r}: this machine has no CUDA GPU PyTorch can use; use device='cpu'")
        _check_options(score_thr, tile, batch_size)  # before the (slow) load
        self._setup(load_backend(path, self.device, overrides=overrides, classes=classes, preset=preset), path,
                    score_thr, tile, batch_size)

    @classmethod
    def from_backend(cls, backend: Backend, score_thr: float | None = None, *, tile: int | None = None,
                     batch_size: int | None = None, name: str = "<backend>") -> Detector:
        """A Detector around another model with the :class:`~oilleak.predict.backends.Backend` interface (a
        stand-in in tests, a model of your own): the same files, results and service on top."""
        detector = cls.__new__(cls)
        detector.device = backend.device
        detector._setup(backend, name, score_thr, tile, batch_size)
        return detector

    def _setup(self, backend: Backend, path: str | Path, score_thr: float | None, tile: int | None,
               batch_size: int | None) -> None:
        _check_options(score_thr, tile, batch_size)
        self._backend = backend
        self.path = Path(path)
        self.classes: list[str] = backend.classes
        self.score_thr: float = backend.score_thr if score_thr is None else float(score_thr)
        self.tile = tile
        self.batch_size = batch_size or (GPU_BATCH if self.device.type == "cuda" and backend.batched else 1)

    def __repr__(self) -> str:
        return f"Detector({str(self.path)!r}, device={str(self.device)!r}, score_thr={self.score_thr:g})"

    @property
    def info(self) -> dict:
        """The model's file name, preset, classes, input scale, threshold and device."""
        return {**self._backend.info(), "score_thr": self.score_thr}

    def __call__(self, source: ImageLike | Iterable[ImageLike], *, score_thr: float | None = None,
                 every: int | None = None, fps: float | None = None) -> list[Result]:
        """One Result per image (per kept frame for a video), in input order. Raises on an unreadable input."""
        return list(self.stream(source, score_thr=score_thr, every=every, fps=fps))

    def stream(self, source: ImageLike | Iterable[ImageLike], *, score_thr: float | None = None,
               every: int | None = None, fps: float | None = None, errors: str = "raise") -> Iterator[Result]:
        """:meth:`__call__` as a generator, holding a few images at a time (photo archives, long videos).
        A video is read every ``every``-th frame, or at about ``fps`` frames a second. ``errors="report"``: an
        input that cannot be read yields a Result with ``error`` set instead of raising."""
        if errors not in ("raise", "report"):
            raise OilleakError(f"errors={errors!r}: use 'raise' or 'report'")
        thr = self.score_thr if score_thr is None else float(score_thr)
        report = errors == "report"
        items = _prefetch(_items(source, every, fps, report))
        for batch in self._batches(items):
            try:
                answers = self._predict(batch, thr)
            except (OilleakError, torch.OutOfMemoryError) as exc:
                if not report:
                    raise
                reason = str(exc).splitlines()[0]
                if isinstance(exc, torch.OutOfMemoryError):
                    reason = f"out of memory ({reason[:80]}); try tile=1333 (--tile 1333) or the CPU"
                for item in batch:
                    item.image, item.error = None, reason
                answers = [None] * len(batch)
            for item, found in zip(batch, answers):
                yield self._result(item, found, thr)

    # the one inference path under stream(), `oilleak serve` and `oilleak predict`
    def predict_arrays(self, images: list[np.ndarray], min_score: float, tile: int | None = None,
                       before_tile: Callable[[], None] | None = None) -> list[Found]:
        """Instances scoring ``min_score`` or more (holes filled), for RGB uint8 images; ``tile`` overrides the
        detector's. Several images without tiling run as one batch. ``before_tile`` is called before each
        tile's pass (the service stops a tiled photo there when it shuts down)."""
        tile = self.tile if tile is None else tile
        if not tile:
            found = self._backend(images, min_score)
        else:
            found = [self._tiled(image, min_score, tile, before_tile) for image in images]
        return [Found([fill_holes(inst) for inst in f.instances], f.top_score) for f in found]

    def result(self, image: np.ndarray, found: Found, computed_thr: float, score_thr: float | None = None,
               source: str = "<array>") -> Result:
        """The Result of :meth:`predict_arrays`'s answer for ``image`` (run at ``computed_thr``), shown at
        ``score_thr`` (default: the same)."""
        thr = computed_thr if score_thr is None else score_thr
        return Result(source, image, self.classes, thr, found.instances, computed_thr, found.top_score)

    def _tiled(self, image: np.ndarray, min_score: float, tile: int, before_tile: Callable[[], None] | None) -> Found:
        tops: list[float] = []

        def one_tile(part: np.ndarray) -> list[Instance]:
            if before_tile is not None:
                before_tile()
            (found,) = self._backend([part], min_score)
            if found.top_score is not None:
                tops.append(found.top_score)
            return found.instances

        instances = predict_tiled(image, one_tile, tile)
        return Found(instances, max(tops) if tops else None)

    def _batches(self, items: Iterator[_Item]) -> Iterator[list[_Item]]:
        batch: list[_Item] = []
        for item in items:
            if item.image is None or self.batch_size == 1:  # a failure goes alone, in its place
                if batch:
                    yield batch
                    batch = []
                yield [item]
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _predict(self, batch: list[_Item], thr: float) -> list[Found | None]:
        if batch[0].image is None:
            return [None]
        return self.predict_arrays([item.image for item in batch], thr)

    def _result(self, item: _Item, found: Found | None, thr: float) -> Result:
        image = item.image if found is not None else np.zeros((0, 0, 3), np.uint8)  # None: item.error says why
        found = found or Found([], None)
        return Result(item.source, image, self.classes, thr, found.instances, thr, found.top_score,
                      item.frame, item.time_s, item.error)


def _check_options(score_thr: float | None, tile: int | None, batch_size: int | None) -> None:
    if tile is not None and tile < 64:
        raise OilleakError(f"tile {tile}: tiles must be at least 64 pixels (e.g. tile=1333)")
    if batch_size is not None and batch_size < 1:
        raise OilleakError(f"batch_size {batch_size}: must be 1 or more")
    if score_thr is not None and not 0.0 <= score_thr <= 1.0:
        raise OilleakError(f"score_thr {score_thr}: must be between 0 and 1")


def _items(source: ImageLike | Iterable[ImageLike], every: int | None, fps: float | None,
           report: bool) -> Iterator[_Item]:
    """Every image the inputs name, decoded in order (a folder's images sorted, recursively; a glob's matches)."""
    from oilleak.data.transforms import load_image
    from oilleak.predict.predictor import find_images

    single = isinstance(source, (str, Path, np.ndarray, Mapping)) or _is_pil(source) or not isinstance(source, Iterable)
    inputs = [source] if single else list(source)
    for entry in inputs:
        if isinstance(entry, np.ndarray):
            yield _Item("<array>", _checked_array(entry))
        elif _is_pil(entry):
            yield _Item("<PIL image>", _from_pil(entry))
        elif isinstance(entry, (str, Path)) and is_video(entry):
            for frame in read_frames(entry, every, fps):
                yield _Item(str(entry), frame.image, frame=frame.index, time_s=frame.time_s)
        elif isinstance(entry, (str, Path)):
            sources, problems = find_images([str(entry)])
            if problems and not sources:
                text, why = problems[0]
                if not report:
                    raise OilleakError(f"{text}: {why}")
                yield _Item(text, None, why)
            for found in sources:
                if is_video(found.path):
                    yield from _items(found.path, every, fps, report)
                    continue
                try:
                    yield _Item(str(found.path), load_image(found.path))
                except OilleakError as exc:
                    reason = _unreadable(found.path, exc)
                    if not report:
                        raise OilleakError(reason) from None
                    yield _Item(str(found.path), None, reason)
        else:
            raise OilleakError(f"cannot predict a {type(entry).__name__}: pass a file, folder or glob path, a video, "
                               "an RGB numpy array (H, W, 3) uint8, a PIL image, or a list of these")


def _unreadable(path: Path, exc: OilleakError) -> str:
    """Why ``path`` gave no image; for a name that is neither an image's nor a video's, the formats that work."""
    from oilleak.predict.predictor import IMAGE_EXTENSIONS
    from oilleak.predict.video import FORMATS

    reason = str(exc).splitlines()[0]
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        reason += f" (images: {', '.join(sorted(e[1:].upper() for e in IMAGE_EXTENSIONS))}; videos: {FORMATS})"
    return reason


def _is_pil(obj: object) -> bool:
    return type(obj).__module__.startswith("PIL.")


def _from_pil(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _checked_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise OilleakError(f"an image array must be RGB (H, W, 3) uint8 (or gray (H, W)); got {array.shape} {array.dtype}")
    if min(array.shape[:2]) < 1:
        raise OilleakError(f"an image array must have pixels; got {array.shape}")
    return np.ascontiguousarray(array[..., :3])


_DONE = object()


def _prefetch(items: Iterator[_Item], depth: int = 2) -> Iterator[_Item]:
    """``items`` decoded ``depth`` ahead in a background thread (decoding releases the GIL), errors re-raised
    in order; the thread stops when the consumer does."""
    buffer: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def fill() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as exc:  # handed to the consumer
            buffer.put(exc)

    thread = threading.Thread(target=fill, name="oilleak-load", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() so the thread can see stop
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(0.05)

