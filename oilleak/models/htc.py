"""Hybrid Task Cascade RoI head (Chen et al. 2019, arXiv 1901.07518) as in mmdet 3.3's
``HybridTaskCascadeRoIHead``: three box stages of rising IoU threshold, each followed by its mask stage
(interleaved), mask information flow between the mask heads, and the fused semantic features added to every
RoI feature.

Shapes: N images, R RoIs of the whole batch, K object classes, C channels. RoIs are (R, 5) rows
``(image index, x1, y1, x2, y2)`` in input (resized) pixels. Box RoI features are 7x7, mask RoI features
14x14, mask logits 28x28.

Training (``loss``), per stage t: match proposals to ground truth and sample them (ground truths added),
box loss, refine the sampled boxes with the stage's regression (ground-truth rows dropped), match and
sample those again, and train mask head t on the positives, running mask heads 0..t-1 first for their
features (gradients flow into them too). The refined boxes are the next stage's proposals.

Inference (``predict``) is a pipeline of public steps, so each can be compared with mmdet on its own:
``semantic_head`` -> ``box_cascade`` -> ``detect`` -> ``mask_cascade`` -> ``finish``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from oilleak.models.bbox_head import Shared2FCBBoxHead
from oilleak.models.box_ops import MaxIoUAssigner, RandomSampler, SamplingResult, batched_nms
from oilleak.models.mask_head import HTCMaskHead, mask_loss, mask_targets, paste_mask_crops, paste_masks
from oilleak.models.roi_align import roi_align, roi_align_by_level
from oilleak.models.semantic_head import FusedSemanticHead
from oilleak.models.specs import InferenceSpec, RoIHeadSpec
from oilleak.structures import CroppedDetections, Detections, ImageMeta, Targets


def boxes_to_rois(boxes_per_image: Sequence[Tensor]) -> Tensor:
    """Per-image (n_i, 4) boxes -> (sum n_i, 5) RoIs with the image index in column 0."""
    rois = [torch.cat([boxes.new_full((len(boxes), 1), i), boxes[:, :4]], dim=1) for i, boxes in enumerate(boxes_per_image)]
    return torch.cat(rois)


def roi_levels(rois: Tensor, num_levels: int, finest_scale: float) -> Tensor:
    """Pyramid level of each RoI: floor(log2(sqrt(area) / finest_scale)), clamped (mmdet's rule: RoIs
    under 2 * finest_scale px on a side on average go to the finest level)."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def multilevel_roi_align(
    feats: Sequence[Tensor], rois: Tensor, output_size: int, strides: Sequence[int], finest_scale: float
) -> Tensor:
    """RoIAlign of every RoI on the level its size maps to -> (R, C, output_size, output_size).

    ``sampling_ratio=0, aligned=True``: mmcv's RoIAlign as mmdet configures it (see ``models/roi_align.py``).
    """
    levels = roi_levels(rois, len(strides), finest_scale)
    return roi_align_by_level(feats[: len(strides)], rois, levels, output_size, [1.0 / s for s in strides])


@dataclass
class BoxCascade:
    """The box branch over all proposals of a batch at test time.

    rois[t]: (R, 5) input RoIs of stage t (stage 0: the proposals); cls[t]: (R, K + 1) raw logits;
    reg[t]: (R, 4) raw deltas; counts: RoIs per image.
    """

    rois: list[Tensor]
    cls: list[Tensor]
    reg: list[Tensor]
    counts: list[int]


@dataclass
class BoxDetections:
    """One image's detections before masks, in input (resized) pixels, sorted by score."""

    boxes: Tensor  # (n, 4)
    scores: Tensor  # (n,)
    labels: Tensor  # (n,) int64

    def above_or_best(self, min_score: float) -> BoxDetections:
        """The detections scoring at least ``min_score``, and the best one in any case (still sorted)."""
        keep = self.scores >= min_score
        keep[:1] = True
        return BoxDetections(self.boxes[keep], self.scores[keep], self.labels[keep])


class HybridTaskCascadeRoIHead(nn.Module):
    """``loss(feats, proposals, metas, targets) -> dict`` and ``predict(feats, proposals, metas) -> Detections``.

    feats: the neck's levels (P2..P6; the RoI heads read P2..P5 and the semantic head all of them).
    Attribute names (``bbox_head.{t}``, ``mask_head.{t}``, ``semantic_head``) match mmdet's state dict.

    Test settings (``inference``): ``score_thr`` (strict ``>``), class-wise NMS at ``nms_iou``, at most ``max_per_img``
    detections, masks binarised at ``mask_thr``; ``mask_merge`` 'last' uses the last stage only (mmdet 3.3, the
    default), 'mean' averages the three stages' mask probabilities (HTC paper, mmdet 2.x, the published numbers).
    """

    def __init__(
        self,
        *,
        bbox_heads: Sequence[Shared2FCBBoxHead],
        mask_heads: Sequence[HTCMaskHead],
        semantic_head: FusedSemanticHead,
        assigners: Sequence[MaxIoUAssigner],
        samplers: Sequence[RandomSampler],
        layout: RoIHeadSpec,
        inference: InferenceSpec,
    ) -> None:
        """``layout``: the stages (their loss weights) and the RoI geometry (feature strides, finest scale, RoI
        sizes, semantic stride), ``inference``: the test settings; both spec objects (``oilleak.models.specs``), whole."""
        super().__init__()
        per_stage = {len(bbox_heads), len(mask_heads), len(assigners), len(samplers), len(layout.stages)}
        if len(per_stage) != 1:
            raise ValueError("bbox_heads, mask_heads, assigners, samplers and layout.stages need one entry per stage")
        if inference.mask_merge not in ("mean", "last"):
            raise ValueError(f"mask_merge must be 'mean' or 'last', not {inference.mask_merge!r}")
        self.bbox_head = nn.ModuleList(bbox_heads)
        self.mask_head = nn.ModuleList(mask_heads)
        self.semantic_head = semantic_head
        self.assigners = list(assigners)
        self.samplers = list(samplers)
        self.layout = layout
        self.inference = inference

    @property
    def num_stages(self) -> int:
        return len(self.bbox_head)

    # ------------------------------------------------------------------------------------------------
    # shared by training and inference

    def _semantic_rois(self, semantic_feat: Tensor, rois: Tensor, size: int) -> Tensor:
        # box features are 7x7: the 14x14 semantic RoI features are average-pooled to match
        return roi_align(semantic_feat, rois, self.layout.mask_roi_size, 1.0 / self.layout.semantic_stride, size)

    def run_box_head(self, stage: int, feats: Sequence[Tensor], semantic_feat: Tensor, rois: Tensor) -> tuple[Tensor, Tensor]:
        """Stage ``stage``'s box head on (R, 5) RoIs -> ((R, K + 1) logits, (R, 4) deltas)."""
        size = self.layout.bbox_roi_size
        roi_feats = multilevel_roi_align(feats, rois, size, self.layout.featmap_strides, self.layout.finest_scale)
        roi_feats = roi_feats + self._semantic_rois(semantic_feat, rois, size)
        return self.bbox_head[stage](roi_feats)

    def mask_roi_features(self, feats: Sequence[Tensor], semantic_feat: Tensor, rois: Tensor) -> Tensor:
        """(R, C, 14, 14) mask RoI features with the semantic RoI features added (shared by all stages)."""
        size = self.layout.mask_roi_size
        roi_feats = multilevel_roi_align(feats, rois, size, self.layout.featmap_strides, self.layout.finest_scale)
        return roi_feats + self._semantic_rois(semantic_feat, rois, size)

    def _decode_per_image(
        self, stage: int, rois: Tensor, deltas: Tensor, counts: list[int], metas: Sequence[ImageMeta]
    ) -> list[Tensor]:
        """Stage ``stage``'s deltas applied to its (R, 5) RoIs, ``counts[i]`` of image i, clamped to that image."""
        coder = self.bbox_head[stage].box_coder
        return [
            coder.decode(rois_i[:, 1:], deltas_i, max_shape=meta.img_shape)
            for rois_i, deltas_i, meta in zip(rois.split(counts), deltas.split(counts), metas)
        ]

    def _mask_features_up_to(self, stage: int, roi_feats: Tensor) -> Tensor:
        """Mask information flow: mask heads 0..stage in sequence, each fed the previous one's features."""
        previous = None
        for head in self.mask_head[: stage + 1]:
            previous = head.features(roi_feats, previous)
        return previous

    # ------------------------------------------------------------------------------------------------
    # training

    def loss(
        self, feats: Sequence[Tensor], proposals: Sequence[Tensor], metas: Sequence[ImageMeta], targets: Sequence[Targets]
    ) -> dict[str, Tensor]:
        """Losses of the semantic branch and of every stage, stage weights applied (``s{t}.acc`` unweighted).

        proposals: per image (n_i, 4) boxes (extra columns, e.g. an RPN score, are ignored); targets in
        input pixels with ``sem_seg`` padded to the batch's padded size.
        """
        semantic_pred, semantic_feat = self.semantic_head(feats)
        sem_seg = torch.stack([t.sem_seg for t in targets])
        losses = {"loss_semantic_seg": self.semantic_head.loss(semantic_pred, sem_seg)}
        boxes = [p[:, :4].detach() for p in proposals]
        for stage in range(self.num_stages):
            stage_losses, boxes = self._stage_loss(stage, feats, semantic_feat, boxes, metas, targets)
            weight = self.layout.stages[stage].loss_weight
            for name, value in stage_losses.items():
                losses[f"s{stage}.{name}"] = value * weight if "loss" in name else value
        return losses

    def _stage_loss(
        self,
        stage: int,
        feats: Sequence[Tensor],
        semantic_feat: Tensor,
        boxes: list[Tensor],
        metas: Sequence[ImageMeta],
        targets: Sequence[Targets],
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """One interleaved stage -> (its unweighted losses, the refined boxes for the next stage)."""
        samples = self._match_and_sample(stage, boxes, targets)
        rois = boxes_to_rois([torch.cat([s.pos_boxes, s.neg_boxes]) for s in samples])
        cls_logits, deltas = self.run_box_head(stage, feats, semantic_feat, rois)
        losses = self._box_loss(stage, cls_logits, deltas, samples)
        refined = self._refine_sampled(stage, rois, deltas.detach(), samples, metas)
        # interleaved: the mask branch trains on the boxes this stage has just refined
        mask_samples = self._match_and_sample(stage, refined, targets)
        losses["loss_mask"] = self._mask_loss(stage, feats, semantic_feat, mask_samples, targets)
        return losses, refined

    def _match_and_sample(self, stage: int, boxes: list[Tensor], targets: Sequence[Targets]) -> list[SamplingResult]:
        samples = []
        for boxes_i, target in zip(boxes, targets):
            assigned = self.assigners[stage].assign(boxes_i, target.boxes, target.labels)
            samples.append(self.samplers[stage].sample(assigned, boxes_i, target.boxes, target.labels))
        return samples

    def _box_loss(self, stage: int, cls_logits: Tensor, deltas: Tensor, samples: list[SamplingResult]) -> dict[str, Tensor]:
        head = self.bbox_head[stage]
        labels, delta_targets = [], []
        for s in samples:
            # sampled RoIs are [positives, negatives]; negatives get the background label K
            labels += [s.pos_gt_labels, s.pos_gt_labels.new_full((s.num_neg,), head.num_classes)]
            delta_targets += [head.box_coder.encode(s.pos_boxes, s.pos_gt_boxes), deltas.new_zeros(s.num_neg, 4)]
        return head.loss(cls_logits, deltas, torch.cat(labels), torch.cat(delta_targets))

    @torch.no_grad()
    def _refine_sampled(
        self, stage: int, rois: Tensor, deltas: Tensor, samples: list[SamplingResult], metas: Sequence[ImageMeta]
    ) -> list[Tensor]:
        """Decode the sampled RoIs with this stage's deltas, clamped to the image; the ground-truth boxes
        the sampler added are dropped again (each stage adds them itself)."""
        decoded = self._decode_per_image(stage, rois, deltas, [s.num_sampled for s in samples], metas)
        return [boxes[torch.cat([~s.pos_is_gt, s.pos_is_gt.new_ones(s.num_neg)])] for boxes, s in zip(decoded, samples)]

    def _mask_loss(
        self,
        stage: int,
        feats: Sequence[Tensor],
        semantic_feat: Tensor,
        samples: list[SamplingResult],
        targets: Sequence[Targets],
    ) -> Tensor:
        rois = boxes_to_rois([s.pos_boxes for s in samples])
        roi_feats = self.mask_roi_features(feats, semantic_feat, rois)
        logits = self.mask_head[stage].logits(self._mask_features_up_to(stage, roi_feats))
        size = logits.shape[-1]
        goal = torch.cat([mask_targets(s.pos_boxes, t.masks, s.pos_gt_index, size) for s, t in zip(samples, targets)])
        labels = torch.cat([s.pos_gt_labels for s in samples])
        return mask_loss(logits, goal, labels)

    # ------------------------------------------------------------------------------------------------
    # inference

    @torch.no_grad()
    def predict(
        self,
        feats: Sequence[Tensor],
        proposals: Sequence[Tensor],
        metas: Sequence[ImageMeta],
        rescale: bool = True,
        mask_crops: bool = False,
        min_score: float = 0.0,
    ) -> list[Detections] | list[CroppedDetections]:
        """Detections per image with masks: in original pixels at ``meta.ori_shape`` (``rescale=True``) or in
        input pixels at ``meta.img_shape``. proposals: per image (n_i, 4) boxes (extra columns ignored).
        ``mask_crops``: keep each mask as its window (:class:`CroppedDetections`), not as a full-size image.
        ``min_score``: drop detections scoring below it before the mask heads run, all but the best one (a
        caller that keeps only those saves their masks' work, and can still say how close the best came; the
        kept masks do not depend on the dropped ones)."""
        _, semantic_feat = self.semantic_head(feats)
        cascade = self.box_cascade(feats, semantic_feat, proposals, metas)
        detections = self.detect(cascade, metas)
        if min_score > 0:
            detections = [d.above_or_best(min_score) for d in detections]
        probs = self.mask_probabilities(feats, semantic_feat, boxes_to_rois([d.boxes for d in detections]))
        return self.finish(detections, probs, metas, rescale, mask_crops)

    def box_cascade(
        self, feats: Sequence[Tensor], semantic_feat: Tensor, proposals: Sequence[Tensor], metas: Sequence[ImageMeta]
    ) -> BoxCascade:
        """Every stage's box head on all proposals; stage t + 1 runs on stage t's decoded boxes."""
        counts = [len(p) for p in proposals]
        rois = boxes_to_rois(proposals)  # takes the first 4 columns
        cascade = BoxCascade(rois=[], cls=[], reg=[], counts=counts)
        for stage in range(self.num_stages):
            cls_logits, deltas = self.run_box_head(stage, feats, semantic_feat, rois)
            cascade.rois.append(rois)
            cascade.cls.append(cls_logits)
            cascade.reg.append(deltas)
            if stage < self.num_stages - 1:
                rois = boxes_to_rois(self._decode_per_image(stage, rois, deltas, counts, metas))
        return cascade

    def detect(self, cascade: BoxCascade, metas: Sequence[ImageMeta]) -> list[BoxDetections]:
        """Scores: softmax of the stages' mean logits; boxes: the last stage's deltas on its input RoIs.
        Then every (RoI, class) pair scoring above ``score_thr`` enters class-wise NMS; the best
        ``max_per_img`` survive. Boxes stay in input pixels."""
        scores = torch.softmax(sum(cascade.cls) / len(cascade.cls), dim=1)  # mmdet's order of operations
        boxes = self._decode_per_image(self.num_stages - 1, cascade.rois[-1], cascade.reg[-1], cascade.counts, metas)
        return [self._nms(b, s) for b, s in zip(boxes, scores.split(cascade.counts))]

    def _nms(self, boxes: Tensor, scores: Tensor) -> BoxDetections:
        object_scores = scores[:, :-1]  # background is the last column
        roi_index, labels = (object_scores > self.inference.score_thr).nonzero(as_tuple=True)
        candidates, candidate_scores = boxes[roi_index], object_scores[roi_index, labels]
        keep = batched_nms(candidates, candidate_scores, labels, self.inference.nms_iou)[: self.inference.max_per_img]
        return BoxDetections(candidates[keep], candidate_scores[keep], labels[keep])

    def mask_cascade(self, feats: Sequence[Tensor], semantic_feat: Tensor, boxes_per_image: Sequence[Tensor]) -> list[Tensor]:
        """Every stage's (R, K, 28, 28) mask logits on the detected boxes, with mask information flow (each
        stage's, for checking them against mmdet; predicting needs only :meth:`mask_probabilities`)."""
        rois = boxes_to_rois(boxes_per_image)
        roi_feats = self.mask_roi_features(feats, semantic_feat, rois)
        logits, previous = [], None
        for head in self.mask_head:
            previous = head.features(roi_feats, previous)
            logits.append(head.logits(previous))
        return logits

    def mask_probabilities(self, feats: Sequence[Tensor], semantic_feat: Tensor, rois: Tensor) -> Tensor:
        """(R, K, 28, 28) mask probabilities on the detections' (R, 5) RoIs, the stages merged by ``mask_merge``.

        With "last" the earlier stages' heads run only as far as the information flow needs (their features,
        not their upsampling and logits)."""
        roi_feats = self.mask_roi_features(feats, semantic_feat, rois)
        if self.inference.mask_merge == "last":
            return self.mask_head[-1].logits(self._mask_features_up_to(self.num_stages - 1, roi_feats)).sigmoid()
        probs, previous = [], None
        for head in self.mask_head:
            previous = head.features(roi_feats, previous)
            probs.append(head.logits(previous).sigmoid())
        return torch.stack(probs).mean(dim=0)

    def finish(
        self,
        detections: Sequence[BoxDetections],
        probs: Tensor,
        metas: Sequence[ImageMeta],
        rescale: bool = True,
        mask_crops: bool = False,
    ) -> list[Detections] | list[CroppedDetections]:
        """Take each detection's class channel of ``probs`` (:meth:`mask_probabilities`), rescale the boxes to
        the original image (``rescale``) and paste the masks at that image's size (``mask_crops``: into
        windows around the boxes only)."""
        results = []
        for det, probs_i, meta in zip(detections, probs.split([len(d.boxes) for d in detections]), metas):
            boxes, size = det.boxes, meta.img_shape
            if rescale:
                scale_w, scale_h = meta.scale_factor
                boxes, size = boxes / boxes.new_tensor([scale_w, scale_h, scale_w, scale_h]), meta.ori_shape
            class_probs = probs_i[torch.arange(len(det.labels), device=probs_i.device), det.labels]
            if mask_crops:
                crops, origins = zip(*paste_mask_crops(class_probs, boxes, size, self.inference.mask_thr), strict=True) if len(boxes) else ((), ())
                results.append(CroppedDetections(boxes, det.scores, det.labels, list(crops), list(origins)))
            else:
                masks = paste_masks(class_probs, boxes, size, self.inference.mask_thr)
                results.append(Detections(boxes=boxes, scores=det.scores, labels=det.labels, masks=masks))
        return results
