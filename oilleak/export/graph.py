"""The whole detector as one traceable graph: a resized RGB image in, final detections out.

    image (H, W, 3) uint8 RGB, already resized to fit the preset's scale (H, W: any size)
      -> normalise ((x - MEAN) / STD), zero-pad bottom/right to a multiple of 32      (inside the graph)
      -> backbone, recursive feature pyramid, RPN head
      -> proposals: per level the nms_pre best anchors, decoded, clipped, NMS, the best max_per_img
      -> semantic branch; three box stages, each on the previous stage's refined boxes
      -> scores (softmax of the stages' mean logits), class-wise NMS, the best max_per_img
      -> three mask stages with mask information flow on the detected boxes, merged (mean or last)
    boxes (n, 4) float32 in input (resized) pixels, scores (n,), labels (n,) int64,
    masks (n, 28, 28) float32: each detection's mask probability for its own class.

It calls the model's own modules and reproduces ``HybridTaskCascade.predict`` for one image with tensor
operations only, so that the TorchScript tracer records every data-dependent step (sizes of the image,
of the proposals, of the detections) as graph operations instead of constants. What differs from the
PyTorch path, all of it at the level of ties and rounding: every pyramid level is sorted (PyTorch sorts
only levels with more than nms_pre anchors; the order does not matter to NMS), the class offsets of the
batched NMS are computed with a 0 prepended (the same value for boxes clipped to the image), and NMS is
ONNX's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from oilleak.data.transforms import MEAN, SIZE_DIVISOR, STD
from oilleak.models.detector import HybridTaskCascade


def clip_to_image(boxes: Tensor, image_hw: Tensor) -> Tensor:
    """(N, 4) boxes clamped to [0, W] x [0, H]; ``image_hw`` a float (2,) tensor (H, W)."""
    limits = torch.stack([image_hw[1], image_hw[0], image_hw[1], image_hw[0]])
    return torch.minimum(boxes.clamp(min=0), limits)


def class_wise_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou: float) -> Tensor:
    """mmcv's batched NMS: boxes of class c shifted by c * (max coordinate + 1), then one NMS.
    Indices of the kept boxes by decreasing score. Safe on zero boxes (the max has a 0 prepended)."""
    largest = torch.cat([boxes.new_zeros(1), boxes.flatten()]).max()
    shifted = boxes + (classes.to(boxes.dtype) * (largest + 1))[:, None]
    return nms(shifted, scores, iou)


def stage_output_names(num_stages: int, num_levels: int) -> list[str]:
    """Names of the extra outputs of ``DetectorGraph(stages=True)``, in order."""
    per_stage = [f"s{t}.{name}" for t in range(num_stages) for name in ("rois", "cls", "deltas")]
    return ["proposals", *per_stage, *(f"p{level + 2}" for level in range(num_levels))]


class DetectorGraph(nn.Module):
    """``forward(image (H, W, 3) uint8) -> (boxes, scores, labels, masks)``; see the module docstring.

    With ``stages`` the graph also returns what each step made, for checking an export step by step
    (``bench/export_agreement.py``): the proposals (P, 4), for every box stage its input boxes (P, 4), logits
    (P, K + 1) and deltas (P, 4), and the pyramid levels (1, C, h, w).
    """

    def __init__(self, model: HybridTaskCascade, stages: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.stages = stages
        self.register_buffer("mean", torch.tensor(MEAN, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(STD, dtype=torch.float32), persistent=False)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = ((image.float() - self.mean) / self.std).permute(2, 0, 1)[None]
        height, width = x.shape[-2], x.shape[-1]
        image_hw = torch.stack([torch.as_tensor(height), torch.as_tensor(width)]).float()
        x = F.pad(x, (0, (SIZE_DIVISOR - width % SIZE_DIVISOR) % SIZE_DIVISOR, 0, (SIZE_DIVISOR - height % SIZE_DIVISOR) % SIZE_DIVISOR))
        feats = self.model.extract_feat(x)
        proposals = self.proposals(feats, image_hw)
        _, semantic_feat = self.model.roi_head.semantic_head(feats)
        trace: list[Tensor] = []
        boxes, scores, labels = self.detect(feats, semantic_feat, proposals, image_hw, trace)
        outputs = (boxes, scores, labels, self.masks(feats, semantic_feat, boxes, labels))
        return outputs + (proposals, *trace, *feats) if self.stages else outputs

    def proposals(self, feats: list[Tensor], image_hw: Tensor) -> Tensor:
        """The RPN's test-time proposals of the image, (P, 4) by decreasing score (``RPNHead.proposals``)."""
        rpn = self.model.rpn_head
        settings = rpn.test_proposals
        cls_per_level, reg_per_level = rpn(feats)
        scores, deltas, anchors, level_ids = [], [], [], []
        for level, (cls, reg, stride) in enumerate(zip(cls_per_level, reg_per_level, rpn.anchor_generator.strides)):
            level_scores = cls[0].permute(1, 2, 0).reshape(-1).sigmoid()
            level_deltas = reg[0].permute(1, 2, 0).reshape(-1, 4)
            level_anchors = self._anchors(rpn.anchor_generator.base_anchors(stride), cls.shape[-2], cls.shape[-1], stride)
            level_scores, order = level_scores.sort(descending=True)
            order, level_scores = order[: settings.nms_pre], level_scores[: settings.nms_pre]
            scores.append(level_scores)
            deltas.append(level_deltas[order])
            anchors.append(level_anchors[order])
            level_ids.append(torch.full_like(level_scores, level, dtype=torch.long))
        boxes = clip_to_image(rpn.coder.decode(torch.cat(anchors), torch.cat(deltas)), image_hw)
        scores, level_ids = torch.cat(scores), torch.cat(level_ids)
        has_area = ((boxes[:, 2:] - boxes[:, :2]) > settings.min_bbox_size).all(dim=1)
        boxes, scores, level_ids = boxes[has_area], scores[has_area], level_ids[has_area]
        keep = class_wise_nms(boxes, scores, level_ids, settings.nms_iou)[: settings.max_per_img]
        return boxes[keep]

    @staticmethod
    def _anchors(base: Tensor, height, width, stride: int) -> Tensor:
        """(H * W * A, 4) anchors, rows y outer, x inner, anchor fastest (``AnchorGenerator.grid_anchors``)."""
        shift_x = torch.arange(width).float() * stride
        shift_y = torch.arange(height).float() * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (base.to(shifts)[None] + shifts[:, None]).reshape(-1, 4)

    def detect(
        self, feats: list[Tensor], semantic_feat: Tensor, proposals: Tensor, image_hw: Tensor, trace: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The box cascade and class-wise NMS (``box_cascade`` + ``detect`` of the RoI head); every stage's
        input boxes, logits and deltas are appended to ``trace``."""
        head = self.model.roi_head
        boxes = proposals
        logits = []
        for stage in range(head.num_stages):
            cls_logits, deltas = head.run_box_head(stage, feats, semantic_feat, _rois(boxes))
            logits.append(cls_logits)
            trace += [boxes, cls_logits, deltas]
            boxes = clip_to_image(head.bbox_head[stage].box_coder.decode(boxes, deltas), image_hw)
        scores = torch.softmax(sum(logits) / len(logits), dim=1)[:, :-1]  # background is the last column
        roi_index, labels = (scores > head.inference.score_thr).nonzero(as_tuple=True)
        candidates, candidate_scores = boxes[roi_index], scores[roi_index, labels]
        keep = class_wise_nms(candidates, candidate_scores, labels, head.inference.nms_iou)[: head.inference.max_per_img]
        return candidates[keep], candidate_scores[keep], labels[keep]

    def masks(self, feats: list[Tensor], semantic_feat: Tensor, boxes: Tensor, labels: Tensor) -> Tensor:
        """(n, 28, 28) mask probabilities of each detection's class, stages merged (``mask_probabilities``)."""
        merged = self.model.roi_head.mask_probabilities(feats, semantic_feat, _rois(boxes))
        index = labels[:, None, None, None].expand(-1, 1, merged.shape[-2], merged.shape[-1])
        return merged.gather(1, index)[:, 0]


def _rois(boxes: Tensor) -> Tensor:
    """(N, 4) boxes of image 0 -> (N, 5) RoIs (without ``len()``, which the tracer would freeze)."""
    return torch.cat([boxes[:, :1] * 0, boxes], dim=1)
