"""Region proposal network: anchors, the shared head, proposals and the RPN loss (spec sections 5.1-5.5).

Shapes: N images, L pyramid levels, A anchors per location (3), Hl x Wl the size of level l,
T = sum_l Hl * Wl * A anchors per image. Per-level outputs are flattened in (y, x, anchor) order,
which is the order of the anchors: ``(N, A, H, W) -> permute(0, 2, 3, 1) -> (N, H * W * A)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oilleak.models.box_ops import DeltaXYWHBoxCoder, MaxIoUAssigner, RandomSampler, batched_nms
from oilleak.structures import ImageMeta, Targets

# mmdet divides summed losses by (avg_factor + float32 eps), so a batch with nothing sampled gives 0.
LOSS_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class ProposalSettings:
    """How the RPN turns scores into proposals (mmdet ``rpn_proposal`` in training, ``rpn`` at test)."""

    nms_pre: int  # best-scoring anchors kept per level before NMS
    max_per_img: int
    nms_iou: float = 0.7
    min_bbox_size: float = 0.0  # proposals must be strictly wider and taller than this


@dataclass(frozen=True)
class RPNTrainSettings:
    """Anchor labelling and sampling for the RPN loss (mmdet ``train_cfg.rpn``)."""

    pos_iou_thr: float = 0.7
    neg_iou_thr: float = 0.3
    min_pos_iou: float = 0.3
    match_low_quality: bool = True
    num_samples: int = 256  # anchors sampled per image
    pos_fraction: float = 0.5
    # Anchors must lie inside the image, up to this many pixels over its border; negative: no check.
    allowed_border: float = 0.0


class AnchorGenerator:
    """mmdet's AnchorGenerator with ``center_offset=0``: anchors are centred on the TOP-LEFT corner of each
    feature cell (x * stride, y * stride), not on the cell centre; sizes stride * scale * (1/sqrt(r), sqrt(r))."""

    def __init__(self, *, strides: tuple[int, ...], ratios: tuple[float, ...], scales: tuple[float, ...]):
        self.strides = tuple(strides)
        self.ratios = tuple(ratios)
        self.scales = tuple(scales)

    @property
    def num_anchors(self) -> int:
        return len(self.ratios) * len(self.scales)

    def base_anchors(self, stride: int) -> Tensor:
        """(A, 4) anchors around (0, 0), ratio-major: all scales of ratio 0 first."""
        h_ratios = torch.sqrt(torch.tensor(self.ratios))
        w_ratios = 1 / h_ratios
        scales = torch.tensor(self.scales)
        ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    def grid_anchors(self, sizes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """Per level (H * W * A, 4) anchors in ``dtype`` (the features'), rows y outer, x inner, anchor fastest.
        The base anchors are computed in float32 and then cast, as mmdet does."""
        anchors = []
        for (height, width), stride in zip(sizes, self.strides):
            shift_x = torch.arange(width, device=device).to(dtype) * stride
            shift_y = torch.arange(height, device=device).to(dtype) * stride
            xx = shift_x.repeat(height)
            yy = shift_y[:, None].repeat(1, width).reshape(-1)
            shifts = torch.stack([xx, yy, xx, yy], dim=-1)
            anchors.append((self.base_anchors(stride).to(device, dtype)[None] + shifts[:, None]).reshape(-1, 4))
        return anchors

    def valid_flags(self, sizes: list[tuple[int, int]], pad_shape: tuple[int, int], device: torch.device) -> list[Tensor]:
        """Per level (H * W * A,) bool: the anchor's cell lies within this image's padded size (in a batch,
        a smaller image's feature maps extend past its own padding)."""
        flags = []
        for (height, width), stride in zip(sizes, self.strides):
            valid_y = torch.arange(height, device=device) < min(math.ceil(pad_shape[0] / stride), height)
            valid_x = torch.arange(width, device=device) < min(math.ceil(pad_shape[1] / stride), width)
            cell = (valid_y[:, None] & valid_x[None, :]).reshape(-1)
            flags.append(cell[:, None].expand(-1, self.num_anchors).reshape(-1))
        return flags


def _flatten_levels(per_level: list[Tensor], channels: int) -> Tensor:
    # each (N, A * channels, H, W) -> (N, H * W * A, channels); then all levels concatenated
    return torch.cat([x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, channels) for x in per_level], dim=1)


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared over the pyramid levels, then 1x1 convs for A objectness logits and A x 4
    box deltas per location. Attribute names follow mmdet's state dict (``rpn_conv``, ``rpn_cls``, ``rpn_reg``)."""

    def __init__(
        self,
        *,
        in_channels: int,
        feat_channels: int,
        anchor_generator: AnchorGenerator,
        train_settings: RPNTrainSettings,
        train_proposals: ProposalSettings,
        test_proposals: ProposalSettings,
        coder_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        bbox_loss_beta: float = 1.0 / 9.0,
    ):
        super().__init__()
        self.anchor_generator = anchor_generator
        num_anchors = anchor_generator.num_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.train_settings = train_settings
        self.train_proposals = train_proposals
        self.test_proposals = test_proposals
        self.coder = DeltaXYWHBoxCoder(stds=coder_stds)
        self.bbox_loss_beta = bbox_loss_beta
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: objectness logits (N, A, H, W) and deltas (N, A * 4, H, W)."""
        cls_per_level, reg_per_level = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            cls_per_level.append(self.rpn_cls(x))
            reg_per_level.append(self.rpn_reg(x))
        return cls_per_level, reg_per_level

    # ------------------------------------------------------------------------------------------ proposals

    @torch.no_grad()
    def proposals(self, cls_per_level: list[Tensor], reg_per_level: list[Tensor], metas: list[ImageMeta], training: bool) -> list[Tensor]:
        """Per image (n, 5) ``x1, y1, x2, y2, score`` in input pixels, by decreasing score; (0, 5) if none survive.

        Per level the ``nms_pre`` best anchors are decoded (clamped to the image), boxes without area are
        dropped, NMS runs per level, and the best ``max_per_img`` are kept. No gradient flows into them.
        """
        settings = self.train_proposals if training else self.test_proposals
        sizes = [tuple(x.shape[-2:]) for x in cls_per_level]
        anchors_per_level = self.anchor_generator.grid_anchors(sizes, cls_per_level[0].device, cls_per_level[0].dtype)
        return [
            self._proposals_in_image(
                [c[i].detach() for c in cls_per_level], [r[i].detach() for r in reg_per_level], anchors_per_level, meta, settings
            )
            for i, meta in enumerate(metas)
        ]

    def _proposals_in_image(
        self, cls_i: list[Tensor], reg_i: list[Tensor], anchors_per_level: list[Tensor], meta: ImageMeta, settings: ProposalSettings
    ) -> Tensor:
        scores, deltas, anchors, level_ids = [], [], [], []
        for level, (cls, reg, level_anchors) in enumerate(zip(cls_i, reg_i, anchors_per_level)):
            level_scores = cls.permute(1, 2, 0).reshape(-1).sigmoid()  # (A, H, W) -> (H * W * A,)
            level_deltas = reg.permute(1, 2, 0).reshape(-1, 4)  # (A * 4, H, W) -> (H * W * A, 4)
            if 0 < settings.nms_pre < level_scores.numel():
                # an unstable sort, as mmdet's, only when the level has more candidates than nms_pre
                level_scores, order = level_scores.sort(descending=True)
                order, level_scores = order[: settings.nms_pre], level_scores[: settings.nms_pre]
                level_deltas, level_anchors = level_deltas[order], level_anchors[order]
            scores.append(level_scores)
            deltas.append(level_deltas)
            anchors.append(level_anchors)
            level_ids.append(torch.full_like(level_scores, level, dtype=torch.long))
        boxes = self.coder.decode(torch.cat(anchors), torch.cat(deltas), max_shape=meta.img_shape)
        scores, level_ids = torch.cat(scores), torch.cat(level_ids)
        wh = boxes[:, 2:] - boxes[:, :2]
        has_area = (wh > settings.min_bbox_size).all(dim=1)
        boxes, scores, level_ids = boxes[has_area], scores[has_area], level_ids[has_area]
        keep = batched_nms(boxes, scores, level_ids, settings.nms_iou)[: settings.max_per_img]
        return torch.cat([boxes[keep], scores[keep, None]], dim=1)

    # ------------------------------------------------------------------------------------------ loss

    def loss(self, cls_per_level: list[Tensor], reg_per_level: list[Tensor], metas: list[ImageMeta], targets: list[Targets]) -> dict[str, Tensor]:
        """Objectness BCE over the sampled anchors and smooth-L1 on the positives' deltas, both divided by
        the number of sampled anchors in the batch (mmdet's avg_factor, not the number of positives)."""
        sizes = [tuple(x.shape[-2:]) for x in cls_per_level]
        device = cls_per_level[0].device
        anchors = torch.cat(self.anchor_generator.grid_anchors(sizes, device))  # float32 whatever the model's dtype, as mmdet's
        logits = _flatten_levels(cls_per_level, 1).squeeze(-1)  # (N, T)
        deltas = _flatten_levels(reg_per_level, 4)  # (N, T, 4)

        cls_losses, bbox_losses, num_sampled = [], [], 0
        for i, (meta, target) in enumerate(zip(metas, targets)):
            sampled, objectness, pos, pos_deltas = self._anchor_targets(anchors, sizes, meta, target)
            num_sampled += sampled.numel()
            objectness, pos_deltas = objectness.to(logits.dtype), pos_deltas.to(deltas.dtype)
            cls_losses.append(F.binary_cross_entropy_with_logits(logits[i, sampled], objectness, reduction="sum"))
            bbox_losses.append(F.smooth_l1_loss(deltas[i, pos], pos_deltas, beta=self.bbox_loss_beta, reduction="sum"))
        avg_factor = num_sampled + LOSS_EPS
        return {"loss_rpn_cls": torch.stack(cls_losses).sum() / avg_factor, "loss_rpn_bbox": torch.stack(bbox_losses).sum() / avg_factor}

    @torch.no_grad()
    def _anchor_targets(self, anchors: Tensor, sizes: list[tuple[int, int]], meta: ImageMeta, target: Targets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For one image: indices of the sampled anchors and their 0/1 objectness targets, indices of the
        positive anchors and their delta targets."""
        usable = torch.cat(self.anchor_generator.valid_flags(sizes, meta.pad_shape, anchors.device))
        border = self.train_settings.allowed_border
        if border >= 0:
            height, width = meta.img_shape
            usable &= (anchors[:, 0] >= -border) & (anchors[:, 1] >= -border)
            usable &= (anchors[:, 2] < width + border) & (anchors[:, 3] < height + border)
        # mmdet raises when no anchor fits the image (an image smaller than the smallest anchor); such an
        # image simply contributes nothing here.
        usable_inds = torch.nonzero(usable).flatten()
        s = self.train_settings
        # The ground truth keeps its own dtype: mmdet's IoU then takes each box's area in its own dtype and
        # the rest in the promoted one. With float32 boxes (any real training) that is all float32; with a
        # float64 fixture's boxes the anchors' areas stay float32-rounded, and casting the boxes to float32
        # instead turned IoU ties (gt_max_assign_all) into extra positives.
        gt_boxes = target.boxes.to(anchors.device)
        gt_labels = torch.zeros(len(gt_boxes), dtype=torch.long, device=anchors.device)  # objectness is class-agnostic
        assigner = MaxIoUAssigner(pos_iou_thr=s.pos_iou_thr, neg_iou_thr=s.neg_iou_thr, min_pos_iou=s.min_pos_iou, match_low_quality=s.match_low_quality)
        sampler = RandomSampler(num=s.num_samples, pos_fraction=s.pos_fraction, add_gt_as_proposals=False)
        candidates = anchors[usable_inds]
        sampling = sampler.sample(assigner.assign(candidates, gt_boxes, gt_labels), candidates, gt_boxes, gt_labels)

        pos = usable_inds[sampling.pos_inds]
        sampled = torch.cat([pos, usable_inds[sampling.neg_inds]])
        objectness = torch.cat([anchors.new_ones(sampling.num_pos), anchors.new_zeros(sampling.num_neg)])
        return sampled, objectness, pos, self.coder.encode(sampling.pos_boxes, sampling.pos_gt_boxes)
