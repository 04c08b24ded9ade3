"""Box arithmetic shared by the RPN and the RoI heads: delta coder, IoU, max-IoU assignment, random
sampling and class-wise NMS, each reproducing mmdet 3.3 / mmcv 2.1 to the float (spec sections 5.3, 5.4, 6.5).

Shapes: N candidate boxes (anchors or proposals), K ground-truth boxes. Boxes are ``x1, y1, x2, y2``
float pixels without the +1 of older detectors (width = x2 - x1).

Assignment encoding (``AssignResult.gt_inds``), as in mmdet so traces compare directly:
``IGNORED`` (-1) takes no part in any loss, ``NEGATIVE`` (0) is background, ``k + 1`` is positive for
ground-truth box ``k``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import nms

IGNORED = -1
NEGATIVE = 0

# Predicted log-scale changes are clamped to +-log(1000 / 16): a box may grow or shrink at most 62.5x
# per regression step, which keeps exp() finite on untrained heads (mmdet's wh_ratio_clip = 16 / 1000).
MAX_LOG_SCALE = abs(math.log(16 / 1000))

# IoU denominators are floored at this value so that degenerate (zero-area) boxes give IoU 0, not NaN.
IOU_EPS = 1e-6

# mmcv's batched_nms runs one NMS over class-offset boxes below this many boxes and loops over the
# classes at or above it; the two differ in rare near-threshold cases, so both paths are reproduced.
NMS_SPLIT_THRESHOLD = 10_000


class DeltaXYWHBoxCoder:
    """Boxes <-> regression deltas ``(dx, dy, dw, dh)``, normalised by ``(d - means) / stds``.

    ``dx = (gx - px) / pw``, ``dw = log(gw / pw)`` on centres and sizes; ``decode`` inverts ``encode``
    exactly up to the log-scale clamp and the optional clamp of the result to an image of ``max_shape``.
    """

    def __init__(self, means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0), stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)):
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)

    def encode(self, proposals: Tensor, gt: Tensor) -> Tensor:
        """(N, 4) proposals and their (N, 4) targets -> (N, 4) normalised deltas."""
        proposals, gt = proposals.float(), gt.float()
        px = (proposals[:, 0] + proposals[:, 2]) * 0.5
        py = (proposals[:, 1] + proposals[:, 3]) * 0.5
        pw = proposals[:, 2] - proposals[:, 0]
        ph = proposals[:, 3] - proposals[:, 1]
        gx = (gt[:, 0] + gt[:, 2]) * 0.5
        gy = (gt[:, 1] + gt[:, 3]) * 0.5
        gw = gt[:, 2] - gt[:, 0]
        gh = gt[:, 3] - gt[:, 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, proposals: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None) -> Tensor:
        """(N, 4) proposals and (N, 4) deltas -> (N, 4) boxes, clamped to ``max_shape`` (H, W) if given."""
        if deltas.shape[0] == 0:
            return deltas.new_zeros(0, 4)
        denorm = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        centre = (proposals[:, :2] + proposals[:, 2:]) * 0.5
        size = proposals[:, 2:] - proposals[:, :2]
        new_centre = centre + size * denorm[:, :2]
        new_size = size * denorm[:, 2:].clamp(min=-MAX_LOG_SCALE, max=MAX_LOG_SCALE).exp()
        boxes = torch.cat([new_centre - new_size * 0.5, new_centre + new_size * 0.5], dim=-1)
        return boxes if max_shape is None else clip_boxes(boxes, max_shape)


def clip_boxes(boxes: Tensor, shape: tuple[int, int]) -> Tensor:
    """(N, 4) boxes clamped to an image of ``shape`` (H, W): x into [0, W], y into [0, H]."""
    height, width = shape
    return torch.stack(
        [
            boxes[:, 0].clamp(min=0, max=width),
            boxes[:, 1].clamp(min=0, max=height),
            boxes[:, 2].clamp(min=0, max=width),
            boxes[:, 3].clamp(min=0, max=height),
        ],
        dim=-1,
    )


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(K, 4) x (N, 4) -> (K, N) intersection over union; zero-area pairs give 0 (union floored at IOU_EPS)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - overlap
    return overlap / torch.max(union, union.new_tensor([IOU_EPS]))


@dataclass
class AssignResult:
    """Which ground truth each of N candidates is matched to.

    gt_inds: (N,) int64, ``IGNORED`` / ``NEGATIVE`` / ``k + 1`` for ground-truth box k.
    max_overlaps: (N,) float, each candidate's best IoU with any ground truth (0 when there is none).
    labels: (N,) int64, the matched ground truth's label for positives, -1 otherwise.
    """

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    def with_gts_prepended(self, gt_labels: Tensor) -> AssignResult:
        """The result for ``cat([gt_boxes, candidates])``: every ground truth matched to itself with IoU 1."""
        own = torch.arange(1, len(gt_labels) + 1, dtype=torch.long, device=self.gt_inds.device)
        return AssignResult(
            num_gts=self.num_gts,
            gt_inds=torch.cat([own, self.gt_inds]),
            max_overlaps=torch.cat([self.max_overlaps.new_ones(len(gt_labels)), self.max_overlaps]),
            labels=torch.cat([gt_labels.to(self.labels), self.labels]),
        )


class MaxIoUAssigner:
    """Match each candidate to the ground truth it overlaps most (mmdet's MaxIoUAssigner, IoU mode).

    IoU < ``neg_iou_thr`` -> negative; >= ``pos_iou_thr`` -> positive to its best ground truth; in between
    -> ignored. With ``match_low_quality`` every ground truth whose best IoU reaches ``min_pos_iou`` then
    also claims the candidates that reach that best IoU (all of them with ``gt_max_assign_all``), so no
    ground truth is left without a positive; later ground truths win ties. Without ground truth every
    candidate is negative.
    """

    def __init__(
        self,
        *,
        pos_iou_thr: float,
        neg_iou_thr: float,
        min_pos_iou: float,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
    ):
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality
        self.gt_max_assign_all = gt_max_assign_all

    @torch.no_grad()
    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> AssignResult:
        """(N, 4) candidates, (K, 4) ground-truth boxes and their (K,) labels -> AssignResult."""
        num_gts, num_boxes = gt_boxes.shape[0], boxes.shape[0]
        gt_inds = torch.full((num_boxes,), IGNORED, dtype=torch.long, device=boxes.device)
        labels = torch.full((num_boxes,), -1, dtype=torch.long, device=boxes.device)
        if num_gts == 0 or num_boxes == 0:
            if num_gts == 0:
                gt_inds[:] = NEGATIVE
            return AssignResult(num_gts, gt_inds, boxes.new_zeros(num_boxes), labels)

        overlaps = box_iou(gt_boxes, boxes[:, :4])  # (K, N)
        max_overlaps, argmax_overlaps = overlaps.max(dim=0)
        gt_max_overlaps, gt_argmax_overlaps = overlaps.max(dim=1)

        gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = NEGATIVE
        positive = max_overlaps >= self.pos_iou_thr
        gt_inds[positive] = argmax_overlaps[positive] + 1
        if self.match_low_quality:
            for k in range(num_gts):
                if gt_max_overlaps[k] >= self.min_pos_iou:
                    if self.gt_max_assign_all:
                        gt_inds[overlaps[k] == gt_max_overlaps[k]] = k + 1
                    else:
                        gt_inds[gt_argmax_overlaps[k]] = k + 1

        positive = gt_inds > 0
        labels[positive] = gt_labels.to(labels)[gt_inds[positive] - 1]
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)


@dataclass
class SamplingResult:
    """The candidates a loss uses: ``boxes[pos_inds]`` then ``boxes[neg_inds]``, each in increasing index order.

    ``boxes`` are the candidates the indices refer to (ground-truth boxes first when the sampler adds them);
    ``pos_is_gt`` marks positives that are ground-truth boxes themselves.
    """

    pos_inds: Tensor  # (P,) int64
    neg_inds: Tensor  # (Q,) int64
    boxes: Tensor  # (N', 4)
    pos_is_gt: Tensor  # (P,) bool
    pos_gt_index: Tensor  # (P,) int64, 0-based index of the matched ground truth
    pos_gt_boxes: Tensor  # (P, 4)
    pos_gt_labels: Tensor  # (P,) int64

    @property
    def pos_boxes(self) -> Tensor:
        return self.boxes[self.pos_inds]

    @property
    def neg_boxes(self) -> Tensor:
        return self.boxes[self.neg_inds]

    @property
    def num_pos(self) -> int:
        return int(self.pos_inds.numel())

    @property
    def num_neg(self) -> int:
        return int(self.neg_inds.numel())

    @property
    def num_sampled(self) -> int:
        """What mmdet's losses divide by (``avg_factor``): positives plus negatives."""
        return self.num_pos + self.num_neg


class RandomSampler:
    """Draw at most ``num * pos_fraction`` positives at random, then fill up to ``num`` with random negatives.

    With ``add_gt_as_proposals`` the ground-truth boxes are prepended to the candidates first, so every
    ground truth is a positive candidate of itself. Randomness comes from ``generator`` (torch's global
    generator when None), as mmdet draws it with ``torch.randperm``.
    """

    def __init__(self, *, num: int, pos_fraction: float, add_gt_as_proposals: bool, generator: torch.Generator | None = None):
        self.num = int(num)
        self.pos_fraction = pos_fraction
        self.add_gt_as_proposals = add_gt_as_proposals
        self.generator = generator

    def _choose(self, candidates: Tensor, count: int) -> Tensor:
        if candidates.numel() <= count:
            return candidates
        perm = torch.randperm(candidates.numel(), generator=self.generator)[:count].to(candidates.device)
        return candidates[perm]

    @torch.no_grad()
    def sample(self, assign_result: AssignResult, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> SamplingResult:
        boxes = boxes[:, :4]
        is_gt = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        if self.add_gt_as_proposals and len(gt_boxes) > 0:
            boxes = torch.cat([gt_boxes.to(boxes), boxes])
            assign_result = assign_result.with_gts_prepended(gt_labels)
            is_gt = torch.cat([torch.ones(len(gt_boxes), dtype=torch.bool, device=boxes.device), is_gt])

        positives = torch.nonzero(assign_result.gt_inds > 0).flatten()
        # unique() also sorts: mmdet's sampled sets are in increasing candidate order.
        pos_inds = self._choose(positives, int(self.num * self.pos_fraction)).unique()
        negatives = torch.nonzero(assign_result.gt_inds == NEGATIVE).flatten()
        neg_inds = self._choose(negatives, self.num - pos_inds.numel()).unique()

        pos_gt_index = assign_result.gt_inds[pos_inds] - 1
        pos_gt_boxes = gt_boxes.to(boxes)[pos_gt_index] if len(gt_boxes) > 0 else boxes.new_zeros(0, 4)
        return SamplingResult(
            pos_inds=pos_inds,
            neg_inds=neg_inds,
            boxes=boxes,
            pos_is_gt=is_gt[pos_inds],
            pos_gt_index=pos_gt_index,
            pos_gt_boxes=pos_gt_boxes,
            pos_gt_labels=assign_result.labels[pos_inds],
        )


def _nms_in_mmcv_order(boxes: Tensor, scores: Tensor, iou_thr: float) -> Tensor:
    """torchvision ``nms`` visiting boxes in mmcv's order (an unstable descending sort; torchvision's own
    sort is stable, which differs between tied scores). Returns indices into ``boxes``, by score."""
    order = scores.sort(descending=True)[1]
    return order[nms(boxes[order], scores[order], iou_thr)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_thr: float) -> Tensor:
    """Class-wise NMS exactly as mmcv 2.1's ``batched_nms``: boxes of class c are shifted by
    ``c * (max_coordinate + 1)`` so different classes never overlap, then one NMS runs on all of them
    (per class at or above NMS_SPLIT_THRESHOLD boxes, still on the shifted boxes).

    (N, 4) boxes, (N,) scores, (N,) int class ids -> int64 indices of the kept boxes, by decreasing score.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    shifted = boxes + offsets[:, None]
    if shifted.shape[0] < NMS_SPLIT_THRESHOLD:
        return _nms_in_mmcv_order(shifted, scores, iou_thr)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for class_id in torch.unique(idxs):
        members = (idxs == class_id).nonzero().flatten()
        kept[members[_nms_in_mmcv_order(shifted[members], scores[members], iou_thr)]] = True
    keep = kept.nonzero().flatten()
    return keep[scores[keep].sort(descending=True)[1]]
