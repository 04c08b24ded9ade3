"""How closely an exported file run by ONNX Runtime agrees with oilleak's PyTorch model, end to end and
step by step (used by ``tests/test_export.py`` and ``bench/export_agreement.py``).

End to end: every PyTorch detection looks for an unused ONNX detection of the same label with box IoU of at
least ``MIN_BOX_IOU`` and a score within ``MAX_SCORE_DIFF`` (float32 files; a float16 file is held to wider
bounds, ``FP16_SCORE_DIFF``); matched pairs compare their pasted masks.
Step by step (an export made with ``stages=True``): each step of the PyTorch model is run on what the
ONNX graph fed the same step, so an error is seen where it arises instead of after the cascade has
amplified it (a randomly initialised DetectoRS turns rounding into different proposals).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from oilleak.data.transforms import pad_batch, prepare_image
from oilleak.export.onnx_runtime import OnnxDetections, OnnxModel
from oilleak.export.postprocess import resize_for_graph
from oilleak.models.box_ops import box_iou
from oilleak.models.htc import boxes_to_rois
from oilleak.structures import Detections

MIN_BOX_IOU = 0.99
MAX_SCORE_DIFF = 1e-3
FP16_SCORE_DIFF = 1e-2


@dataclass
class Agreement:
    torch_detections: int = 0
    onnx_detections: int = 0
    matched: int = 0
    mask_ious: list[float] = field(default_factory=list)

    @property
    def matched_fraction(self) -> float:
        return self.matched / max(self.torch_detections, self.onnx_detections, 1)

    def masks_at_least(self, iou: float) -> float:
        """Fraction of matched pairs whose masks overlap with at least this IoU."""
        return float(np.mean(np.array(self.mask_ious) >= iou)) if self.mask_ious else 1.0

    def add(self, other: Agreement) -> None:
        self.torch_detections += other.torch_detections
        self.onnx_detections += other.onnx_detections
        self.matched += other.matched
        self.mask_ious += other.mask_ious


def torch_detections(model: torch.nn.Module, image: np.ndarray, scale: tuple[int, int]) -> Detections:
    """oilleak's PyTorch prediction of one photo (the ``Predictor`` path, before the score threshold)."""
    tensor, meta = prepare_image(image, scale)
    batch, _ = pad_batch([tensor])
    with torch.inference_mode():
        return model(batch, [meta])[0]


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(ref: Detections, got: OnnxDetections, min_box_iou: float = MIN_BOX_IOU, max_score_diff: float = MAX_SCORE_DIFF) -> Agreement:
    result = Agreement(torch_detections=len(ref), onnx_detections=len(got))
    if len(ref) == 0 or len(got) == 0:
        return result
    ious = box_iou(ref.boxes.float(), torch.from_numpy(got.boxes).float()).numpy()
    same_label = ref.labels.numpy()[:, None] == got.labels[None, :]
    close_score = np.abs(ref.scores.numpy()[:, None] - got.scores[None, :]) <= max_score_diff
    candidates = np.where(same_label & close_score & (ious >= min_box_iou), ious, -1.0)
    used = np.zeros(len(got), bool)
    for i in range(len(ref)):  # by decreasing PyTorch score
        row = np.where(used, -1.0, candidates[i])
        j = int(row.argmax())
        if row[j] < 0:
            continue
        used[j] = True
        result.matched += 1
        result.mask_ious.append(_mask_iou(ref.masks[i].numpy(), got.mask(j)))
    return result


@dataclass
class StageErrors:
    """Largest absolute difference of each step, PyTorch vs ONNX on the same input, and the scale of the
    values compared (its largest absolute value) to read it against."""

    errors: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    def relative(self, name: str) -> float:
        return self.errors[name] / max(self.scales[name], 1e-12)

    def note(self, name: str, expected: torch.Tensor, got: np.ndarray) -> None:
        expected = expected.float().numpy()
        diff = float(np.abs(expected - got).max()) if expected.size else 0.0
        scale = float(np.abs(expected).max()) if expected.size else 0.0
        self.errors[name] = max(self.errors.get(name, 0.0), diff)
        self.scales[name] = max(self.scales.get(name, 0.0), scale)


def stage_errors(model: torch.nn.Module, onnx_model: OnnxModel, image: np.ndarray, errors: StageErrors | None = None) -> StageErrors:
    """Step by step comparison on one photo; ``onnx_model`` must come from an export with ``stages=True``."""
    errors = errors or StageErrors()
    resized, _ = resize_for_graph(image, onnx_model.scale)
    outputs = dict(zip([o.name for o in onnx_model.session.get_outputs()], onnx_model.session.run(None, {"image": resized})))
    head = model.roi_head
    tensor, _ = prepare_image(image, onnx_model.scale)
    batch, _ = pad_batch([tensor])
    with torch.inference_mode():
        feats = model.extract_feat(batch)
        for level, feat in enumerate(feats):
            errors.note(f"p{level + 2}", feat, outputs[f"p{level + 2}"])
        _, semantic_feat = head.semantic_head(feats)
        for stage in range(head.num_stages):
            boxes = torch.from_numpy(outputs[f"s{stage}.rois"])
            rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1)
            cls_logits, deltas = head.run_box_head(stage, feats, semantic_feat, rois)
            errors.note(f"s{stage}.cls", cls_logits, outputs[f"s{stage}.cls"])
            errors.note(f"s{stage}.deltas", deltas, outputs[f"s{stage}.deltas"])
        boxes, labels = torch.from_numpy(outputs["boxes"]), torch.from_numpy(outputs["labels"]).long()
        if len(boxes):
            probs = head.mask_probabilities(feats, semantic_feat, boxes_to_rois([boxes]))
            errors.note("masks", probs[torch.arange(len(labels)), labels], outputs["masks"])
    return errors
