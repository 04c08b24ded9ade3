"""The checkpoint's model, loaded once, as a function of a list of images (one padded batch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oilleak.config import Config
from oilleak.export.onnx_runtime import OnnxModel, OnnxPredictor
from oilleak.predict.instances import Instance, instances_from_detections


@dataclass
class ServedModel:
    model: nn.Module
    config: Config
    device: torch.device
    checkpoint: str  # the file name, for /health and answers (never the server's full path)

    @classmethod
    def load(cls, ckpt: Path, device: torch.device, overrides: list[str] | None = None) -> ServedModel | OnnxServedModel:
        """An oilleak checkpoint, or an `oilleak export` .onnx file (run by ONNX Runtime on the CPU)."""
        from oilleak.export.onnx_runtime import is_onnx_file
        from oilleak.models.checkpoint import model_from_checkpoint
        from oilleak.models.inference_path import prepare_for_inference

        if is_onnx_file(ckpt):
            return OnnxServedModel.load(ckpt, overrides)
        model, config = model_from_checkpoint(ckpt, device, overrides)
        return cls(prepare_for_inference(model, device), config, device, Path(ckpt).name)

    @property
    def preset(self) -> str:
        return self.config.model.preset

    @property
    def score_thr(self) -> float:
        return self.config.predict.score_thr

    @property
    def classes(self) -> list[str]:
        return list(self.config.data.classes)

    @property
    def info(self) -> dict:
        return {"checkpoint": self.checkpoint, "preset": self.preset, "classes": self.classes,
                "scale": list(self.config.data.scale), "score_thr": self.score_thr, "device": str(self.device)}

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray], min_score: float = 0.0) -> list[list[Instance]]:
        """The instances scoring ``min_score`` or more and the best one, with masks (each request then applies
        its own threshold; masks are not computed for the detections no answer shows)."""
        from oilleak.data.transforms import pad_batch, prepare_image

        prepared = [prepare_image(image, tuple(self.config.data.scale)) for image in images]
        batch, _ = pad_batch([tensor for tensor, _ in prepared])
        detections = self.model.predict(batch.to(self.device), [meta for _, meta in prepared], mask_crops=True,
                                        min_score=min_score)
        return [instances_from_detections(dets, 0.0) for dets in detections]


@dataclass
class OnnxServedModel:
    """An `oilleak export` file behind the same interface; classes, scale and threshold come from its metadata."""

    onnx: OnnxModel
    checkpoint: str
    device = torch.device("cpu")

    @classmethod
    def load(cls, path: Path, overrides: list[str] | None = None) -> OnnxServedModel:
        from oilleak.errors import OilleakError

        if overrides:
            raise OilleakError(f"{path}: an .onnx file carries its settings; --set applies to checkpoints only")
        return cls(OnnxModel(path), Path(path).name)

    @property
    def classes(self) -> list[str]:
        return list(self.onnx.classes)

    @property
    def preset(self) -> str:
        return self.onnx.metadata.get("oilleak.preset", "onnx")

    @property
    def score_thr(self) -> float:
        return self.onnx.score_thr

    @property
    def info(self) -> dict:
        return {"checkpoint": self.checkpoint, "preset": self.preset, "classes": self.classes,
                "scale": list(self.onnx.scale), "score_thr": self.score_thr, "device": "cpu (onnxruntime)"}

    def __call__(self, images: list[np.ndarray], min_score: float = 0.0) -> list[list[Instance]]:
        """Every instance with a mask, whatever its score, one image at a time (the graph takes one; it
        computes every detection's mask, so ``min_score`` saves nothing here)."""
        return [OnnxPredictor(self.onnx, 0.0)(image) for image in images]
