"""The checkpoint's model, loaded once, as a function of a list of images (one padded batch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from oilleak.config import Config
from oilleak.predict.instances import Instance, instances_from_detections


@dataclass
class ServedModel:
    model: nn.Module
    config: Config
    device: torch.device
    checkpoint: str  # the file name, for /health and answers (never the server's full path)

    @classmethod
    def load(cls, ckpt: Path, device: torch.device, overrides: list[str] | None = None) -> ServedModel:
        from oilleak.models.checkpoint import model_from_checkpoint

        model, config = model_from_checkpoint(ckpt, device, overrides)
        return cls(model.eval(), config, device, Path(ckpt).name)

    @property
    def classes(self) -> list[str]:
        return list(self.config.data.classes)

    @property
    def info(self) -> dict:
        return {"checkpoint": self.checkpoint, "preset": self.config.model.preset, "classes": self.classes,
                "scale": list(self.config.data.scale), "score_thr": self.config.predict.score_thr,
                "device": str(self.device)}

    @torch.inference_mode()
    def __call__(self, images: list[np.ndarray]) -> list[list[Instance]]:
        """Every instance with a mask, whatever its score: each request applies its own threshold."""
        from oilleak.data.transforms import pad_batch, prepare_image

        prepared = [prepare_image(image, tuple(self.config.data.scale)) for image in images]
        batch, _ = pad_batch([tensor for tensor, _ in prepared])
        detections = self.model(batch.to(self.device), [meta for _, meta in prepared])
        return [instances_from_detections(dets, 0.0) for dets in detections]
