"""The box head of one cascade stage: two shared fully connected layers, a classifier, a box regressor.

Shapes: R RoIs, C channels, S x S RoI size (7), K object classes. The classifier has K + 1 outputs with the
background LAST (index K), as in mmdet, so mmdet weights load unchanged; regression is class-agnostic (4
deltas per RoI), encoded with this stage's target means / stds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oilleak.models.box_ops import DeltaXYWHBoxCoder

# SmoothL1 transition point of the box loss (mmdet's R-CNN setting; the RPN uses 1/9).
SMOOTH_L1_BETA = 1.0


class Shared2FCBBoxHead(nn.Module):
    """``forward(roi_feats (R, C, S, S)) -> (cls_logits (R, K + 1), deltas (R, 4))``."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        roi_size: int = 7,
        fc_channels: int = 1024,
        target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
        target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList(
            [nn.Linear(in_channels * roi_size * roi_size, fc_channels), nn.Linear(fc_channels, fc_channels)]
        )
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4)
        self.box_coder = DeltaXYWHBoxCoder(means=target_means, stds=target_stds)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        # small initial logits and deltas: every class equally likely, boxes left where they are
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        x = roi_feats.flatten(1)  # (R, C, S, S) -> (R, C*S*S), channel-major like mmdet
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)

    def loss(self, cls_logits: Tensor, deltas: Tensor, labels: Tensor, delta_targets: Tensor) -> dict[str, Tensor]:
        """Losses over R sampled RoIs, positives first.

        labels (R,) in 0..K, K = background; delta_targets (R, 4), read only where labels < K.
        ``loss_cls``: softmax cross entropy averaged over the R RoIs; ``loss_bbox``: SmoothL1 on the
        positives' deltas, summed and divided by R (not by the number of positives), as mmdet does;
        ``acc``: top-1 accuracy in percent. With no RoI or no positive the losses are zeros that still
        belong to the graph.
        """
        num_rois = max(labels.numel(), 1)
        loss_cls = F.cross_entropy(cls_logits, labels, reduction="sum") / num_rois
        with torch.no_grad():
            acc = (cls_logits.argmax(dim=1) == labels).float().sum() * (100.0 / num_rois)
        positive = labels < self.num_classes
        loss_bbox = (
            F.smooth_l1_loss(deltas[positive], delta_targets[positive], beta=SMOOTH_L1_BETA, reduction="sum")
            / num_rois
        )
        return {"loss_cls": loss_cls, "acc": acc, "loss_bbox": loss_bbox}
