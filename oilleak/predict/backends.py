"""The two things a :class:`~oilleak.predict.detector.Detector` can run: a PyTorch model (from an oilleak or an
mmdetection checkpoint) and an `oilleak export` ``.onnx`` file under ONNX Runtime.

Both are the same function, a list of RGB images -> for each image its instances with masks scoring at least
``min_score``, plus the highest score of any detection (so that "nothing found" can say how close the model
came). Every caller (`oilleak predict`, `oilleak serve`, the Python API, the demo) reaches a model through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from oilleak.config import Config
from oilleak.errors import OilleakError
from oilleak.predict.instances import Instance, crop_mask, instances_from_detections


@dataclass
class Found:
    """One image's answer: instances scoring >= the asked minimum, and the best score of any detection."""

    instances: list[Instance]
    top_score: float | None  # None: the model detected nothing at all


class Backend(Protocol):
    classes: list[str]
    scale: tuple[int, int]
    score_thr: float
    device: torch.device
    batched: bool  # whether one call with several images runs them as one batch

    def __call__(self, images: list[np.ndarray], min_score: float) -> list[Found]: ...

    def info(self) -> dict: ...


@dataclass
class TorchBackend:
    """A model ready to predict (``prepare_for_inference``: BatchNorm folded, channels-last on CPU); it is the
    backend's own, built from a file, so nothing the caller holds changes."""

    model: nn.Module
    config: Config
    device: torch.device
    name: str  # the file name, for answers (never a full path)
    batched: bool = field(default=True)

    @property
    def classes(self) -> list[str]:
        return list(self.config.data.classes)

    @property
    def scale(self) -> tuple[int, int]:
        return tuple(self.config.data.scale)

    @property
    def score_thr(self) -> float:
        return self.config.predict.score_thr

    def info(self) -> dict:
        return {"checkpoint": self.name, "preset": self.config.model.preset, "classes": self.classes,
                "scale": list(self.scale), "score_thr": self.score_thr, "device": str(self.device)}

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], min_score: float) -> list[Found]:
        from oilleak.data.transforms import pad_batch, prepare_image

        prepared = [prepare_image(image, self.scale) for image in images]
        batch, _ = pad_batch([tensor for tensor, _ in prepared])
        # masks only for the detections scoring min_score or more (and the best one): none computed in vain
        detections = self.model.predict(batch.to(self.device), [meta for _, meta in prepared], mask_crops=True,
                                        min_score=min_score)
        return [Found(instances_from_detections(dets, min_score), float(dets.scores.max()) if len(dets.scores) else None)
                for dets in detections]


@dataclass
class OnnxBackend:
    """An `oilleak export` file; its classes, scale and threshold come from the file's metadata. The graph takes
    one image and computes every detection's mask, so ``min_score`` only filters."""

    onnx: object  # oilleak.export.onnx_runtime.OnnxModel
    name: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batched: bool = False

    @property
    def classes(self) -> list[str]:
        return list(self.onnx.classes)

    @property
    def scale(self) -> tuple[int, int]:
        return tuple(self.onnx.scale)

    @property
    def score_thr(self) -> float:
        return self.onnx.score_thr

    def info(self) -> dict:
        return {"checkpoint": self.name, "preset": self.onnx.metadata.get("oilleak.preset", "onnx"),
                "classes": self.classes, "scale": list(self.scale), "score_thr": self.score_thr,
                "device": "cpu (onnxruntime)"}

    def __call__(self, images: list[np.ndarray], min_score: float) -> list[Found]:
        return [self._one(image, min_score) for image in images]

    def _one(self, image: np.ndarray, min_score: float) -> Found:
        dets = self.onnx.detect(image)
        out = []
        for i in np.flatnonzero(dets.scores >= min_score):
            cropped = crop_mask(dets.windows[i])
            if cropped is None:  # an empty mask has no outline to show
                continue
            window, (x, y) = cropped
            origin = (dets.origins[i][0] + x, dets.origins[i][1] + y)
            out.append(Instance(int(dets.labels[i]), float(dets.scores[i]), tuple(float(v) for v in dets.boxes[i]),
                                window, origin))
        return Found(out, float(dets.scores.max()) if len(dets) else None)


def load_backend(path: str | Path, device: torch.device, *, overrides: list[str] | None = None,
                 classes: list[str] | None = None, preset: str | None = None) -> TorchBackend | OnnxBackend:
    """An oilleak checkpoint, an mmdetection checkpoint (``classes`` in its label order, unless the file
    records them; ``preset``: its model, detectors_htc_r50 by default) or an `oilleak export` .onnx file."""
    from oilleak.export.onnx_runtime import OnnxModel, is_onnx_file
    from oilleak.models.checkpoint import FORMAT, model_from_checkpoint, read_checkpoint_file
    from oilleak.models.inference_path import prepare_for_inference

    path = Path(path)
    if is_onnx_file(path):
        if overrides or classes or preset:
            raise OilleakError(f"{path}: an .onnx file carries its model, classes and settings; export the checkpoint "
                               "again to change them (--set, classes and preset apply to checkpoints only)")
        if device.type != "cpu":
            raise OilleakError(f"{path}: .onnx files run on the CPU (ONNX Runtime); use device='cpu' or the .pth checkpoint")
        return OnnxBackend(OnnxModel(path), path.name)
    raw = read_checkpoint_file(path)
    if raw.get("format") == FORMAT:
        if classes is not None and list(classes) != list(raw.get("classes", [])):
            raise OilleakError(f"{path} is an oilleak checkpoint for the classes {raw.get('classes')}; it carries its "
                               "classes, so leave classes out (or pass exactly those)")
        if preset is not None:
            raise OilleakError(f"{path} is an oilleak checkpoint: it carries its model; use overrides=['model.x=...'] "
                               "for the settings that may change")
        model, config = model_from_checkpoint(path, device, overrides)
    else:
        model, config = _mmdet_model(path, raw, classes, preset, overrides)
    return TorchBackend(prepare_for_inference(model, device), config, device, path.name)


def _mmdet_model(path: Path, raw: dict, classes: list[str] | None, preset: str | None,
                 overrides: list[str] | None) -> tuple[nn.Module, Config]:
    """An mmdetection checkpoint's model: every tensor of the preset must come from the file."""
    from oilleak.config import config_from_dict
    from oilleak.models.checkpoint import build_with_mmdet_weights, mmdet_classes

    classes = classes if classes is not None else mmdet_classes(raw)
    if classes is None:
        raise OilleakError(f"{path} is an mmdetection checkpoint that does not record its classes: pass them in its "
                           "label order, e.g. Detector(path, classes=['sly_bjbmyw', ...])")
    config = config_from_dict({"data": {"data_root": ".", "classes": list(classes)},
                               "model": {"preset": preset or "detectors_htc_r50"}}, f"the model of {path}", overrides)
    model, _ = build_with_mmdet_weights(config, raw, path)
    return model.eval(), config
