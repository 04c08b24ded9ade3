"""The assembled detector: backbone -> neck -> RPN -> HTC RoI head (mmdet's ``HybridTaskCascade``).

Input: ``images`` (N, 3, H, W) float, RGB normalised, zero-padded bottom/right to a multiple of 32;
``metas`` one ``ImageMeta`` per image; ``targets`` (training) one ``Targets`` per image in input pixels,
``sem_seg`` padded with 255 to (H, W).
Output: in ``train()`` mode a dict of scalar losses (keys as mmdet's: ``loss_rpn_cls``, ``loss_rpn_bbox``,
``loss_semantic_seg``, ``s{t}.loss_cls``, ``s{t}.loss_bbox``, ``s{t}.loss_mask``, ``s{t}.acc``); in ``eval()``
mode one ``Detections`` per image in original pixels. State-dict names are mmdet's (``backbone``, ``neck``,
``rpn_head``, ``roi_head``), so an mmdet checkpoint loads without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from oilleak.models.htc import HybridTaskCascadeRoIHead
from oilleak.models.resnet import ResNet
from oilleak.models.rpn import RPNHead
from oilleak.structures import CroppedDetections, Detections, ImageMeta, Targets


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The training objective: the sum of the entries whose key contains 'loss' (``s{t}.acc`` is a metric)."""
    return sum(value for key, value in losses.items() if "loss" in key)  # type: ignore[return-value]


class HybridTaskCascade(nn.Module):
    def __init__(self, *, backbone: ResNet, neck: nn.Module, rpn_head: RPNHead, roi_head: HybridTaskCascadeRoIHead):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.rpn_head = rpn_head
        self.roi_head = roi_head

    def forward(self, images: Tensor, metas: Sequence[ImageMeta], targets: Sequence[Targets] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("the model is in train() mode and computes losses: pass targets, or call model.eval()")
            return self.loss(images, metas, targets)
        return self.predict(images, metas)

    def extract_feat(self, images: Tensor) -> list[Tensor]:
        """The neck's pyramid P2..P6. Every neck takes the image: the RFP runs a second backbone on it."""
        return self.neck(self.backbone(images), image=images, consume_feats=True)

    def loss(self, images: Tensor, metas: Sequence[ImageMeta], targets: Sequence[Targets]) -> dict[str, Tensor]:
        feats = self.extract_feat(images)
        cls, reg = self.rpn_head(feats)
        losses = self.rpn_head.loss(cls, reg, list(metas), list(targets))
        # The RoI heads train on the proposals the RPN makes now (training settings; the score column is
        # ignored); no gradient flows back through the proposal boxes, as in mmdet.
        proposals = self.rpn_head.proposals(cls, reg, list(metas), training=True)
        losses.update(self.roi_head.loss(feats, proposals, metas, targets))
        return losses

    @torch.no_grad()
    def predict(
        self, images: Tensor, metas: Sequence[ImageMeta], mask_crops: bool = False, min_score: float = 0.0
    ) -> list[Detections] | list[CroppedDetections]:
        """``mask_crops``: masks as windows around their boxes (large photos); ``min_score``: only detections
        scoring at least this get masks and are returned (see ``HybridTaskCascadeRoIHead.predict``)."""
        feats = self.extract_feat(images)
        proposals = self.rpn_head.proposals(*self.rpn_head(feats), list(metas), training=False)
        # the proposals' score column is ignored
        return self.roi_head.predict(feats, proposals, metas, mask_crops=mask_crops, min_score=min_score)
