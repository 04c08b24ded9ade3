"""Run an exported ``.onnx`` file with ONNX Runtime: what the PyTorch model does for a checkpoint, without
PyTorch in the loop (resize, graph, numpy paste; see ``postprocess``). The Python API runs it through
:class:`oilleak.predict.backends.OnnxBackend`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oilleak.errors import OilleakError
from oilleak.export import postprocess
from oilleak.export.onnx_export import OUTPUT_NAMES


@dataclass
class OnnxDetections:
    """One image's detections in its original pixels, as ``structures.Detections`` in numpy; a mask is a
    window of the image (``windows[i]`` with its top-left pixel at ``origins[i]``)."""

    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32, descending
    labels: np.ndarray  # (n,) int64
    windows: list[np.ndarray]
    origins: list[tuple[int, int]]
    image_hw: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    def mask(self, i: int) -> np.ndarray:
        return postprocess.full_mask(self.windows[i], self.origins[i], self.image_hw)


def is_onnx_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".onnx"


class OnnxModel:
    """An exported file loaded in an ONNX Runtime session; ``detect(image)`` -> :class:`OnnxDetections`."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise OilleakError(f"{path}: running an .onnx file needs onnxruntime: pip install 'oilleak[onnx]'") from None
        path = Path(path)
        if not path.is_file():
            raise OilleakError(f"{path}: no such file")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable files
            raise OilleakError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0]}); export it again with `oilleak export`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        try:
            self.classes: list[str] = json.loads(meta["oilleak.classes"])
            self.scale = tuple(json.loads(meta["oilleak.scale"]))
            self.score_thr = float(meta["oilleak.score_thr"])
            self.mask_thr = float(meta["oilleak.mask_thr"])
        except KeyError as exc:
            raise OilleakError(f"{path}: not an oilleak export (metadata {exc.args[0]} is missing); make one with `oilleak export`") from None
        self.metadata = dict(meta)

    def raw(self, resized: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The graph on an already resized (h, w, 3) uint8 image: boxes, scores, labels, 28x28 masks."""
        boxes, scores, labels, masks = self.session.run(list(OUTPUT_NAMES), {"image": resized})
        return boxes, scores, labels, masks

    def detect(self, image: np.ndarray) -> OnnxDetections:
        """An (H, W, 3) RGB uint8 photo -> every detection the graph makes, in the photo's pixels."""
        resized, scale_factor = postprocess.resize_for_graph(image, self.scale)
        boxes, scores, labels, masks = self.raw(resized)
        boxes = postprocess.boxes_to_original(boxes, scale_factor)
        image_hw = image.shape[:2]
        windows, origins = [], []
        for probs, box in zip(masks, boxes):
            window, origin = postprocess.paste_mask(probs, box, image_hw, self.mask_thr)
            windows.append(window)
            origins.append(origin)
        return OnnxDetections(boxes, scores, labels.astype(np.int64), windows, origins, image_hw)
