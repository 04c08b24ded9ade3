"""How closely an exported file run by ONNX Runtime agrees with oilleak's PyTorch model, end to end and
step by step (used by ``tests/test_export.py`` and ``bench/export_agreement.py``).

End to end, through the Python API both run on (:class:`oilleak.predict.detector.Detector`, whose results
`oilleak predict` and `oilleak serve` write): every leak the checkpoint finds looks for an unused leak of the
.onnx file's with the same label, box IoU of at least ``MIN_BOX_IOU`` and a score within ``MAX_SCORE_DIFF``
(float32 files; a float16 file is held to wider bounds, ``FP16_SCORE_DIFF``); matched pairs compare their masks.
Step by step (an export made with ``stages=True``): each step of the PyTorch model is run on what the
ONNX graph fed the same step, so an error is seen where it arises instead of after the cascade has
amplified it (a randomly initialised DetectoRS turns rounding into different proposals).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from oilleak.data.transforms import pad_batch, prepare_image
from oilleak.export.onnx_runtime import OnnxModel
from oilleak.export.postprocess import resize_for_graph
from oilleak.models.box_ops import box_iou
from oilleak.models.htc import boxes_to_rois
from oilleak.predict.result import Result

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


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def compare(ref: Result, got: Result, min_box_iou: float = MIN_BOX_IOU, max_score_diff: float = MAX_SCORE_DIFF) -> Agreement:
    """The leaks of ``got`` (the .onnx file's) matched to those of ``ref`` (the checkpoint's) on one image."""
    result = Agreement(torch_detections=len(ref), onnx_detections=len(got))
    if len(ref) == 0 or len(got) == 0:
        return result
    ref_boxes = torch.tensor([leak.box for leak in ref], dtype=torch.float32)
    got_boxes = torch.tensor([leak.box for leak in got], dtype=torch.float32)
    ious = box_iou(ref_boxes, got_boxes).numpy()
    same_label = np.array([leak.label for leak in ref])[:, None] == np.array([leak.label for leak in got])[None, :]
    scores = np.array([leak.score for leak in ref])[:, None] - np.array([leak.score for leak in got])[None, :]
    candidates = np.where(same_label & (np.abs(scores) <= max_score_diff) & (ious >= min_box_iou), ious, -1.0)
    used = np.zeros(len(got), bool)
    for i, leak in enumerate(ref):  # by decreasing PyTorch score
        row = np.where(used, -1.0, candidates[i])
        j = int(row.argmax())
        if row[j] < 0:
            continue
        used[j] = True
        result.matched += 1
        result.mask_ious.append(_mask_iou(leak.mask(), got.leaks[j].mask()))
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
