"""HTC's fused semantic-segmentation branch (Chen et al. 2019, "Hybrid Task Cascade", section 3.3).

The five pyramid levels are fused at one level (stride 8), a small FCN predicts a per-pixel class map
(background + one channel per class, trained on the semantic maps), and a 1x1 embedding of the same features
is pooled into every RoI feature of the box and mask branches.

Shapes: N images, C pyramid channels, K semantic classes (background included), H8 x W8 the stride-8 size.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from oilleak.models.layers import ConvBlock
from oilleak.structures import SEM_IGNORE


class FusedSemanticHead(nn.Module):
    """``forward(feats) -> (semantic_pred (N, K, H8, W8), semantic_feat (N, C_out, H8, W8))``.

    Attribute names match mmdet's ``FusedSemanticHead`` (``lateral_convs.{i}.conv``, ``convs.{i}.conv``,
    ``conv_embedding.conv``, ``conv_logits``), so mmdet weights load unchanged.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 256,
        conv_out_channels: int = 256,
        num_ins: int = 5,
        fusion_level: int = 1,
        num_convs: int = 4,
        label_scale: float = 1 / 8,
        loss_weight: float = 0.2,
        group_norm: bool = False,
    ) -> None:
        super().__init__()
        self.fusion_level = fusion_level
        self.label_scale = label_scale
        self.loss_weight = loss_weight
        gn = {"group_norm": group_norm}
        self.lateral_convs = nn.ModuleList(ConvBlock(in_channels, in_channels, 1, **gn) for _ in range(num_ins))
        self.convs = nn.ModuleList(
            ConvBlock(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3, padding=1, **gn)
            for i in range(num_convs)
        )
        self.conv_embedding = ConvBlock(conv_out_channels, conv_out_channels, 1, **gn)
        self.conv_logits = nn.Conv2d(conv_out_channels, num_classes, 1)
        nn.init.kaiming_normal_(self.conv_logits.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv_logits.bias)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
        x = self.lateral_convs[self.fusion_level](feats[self.fusion_level])
        size = x.shape[-2:]
        for i, feat in enumerate(feats):
            if i != self.fusion_level:
                # mmdet resizes first, then applies the lateral conv (order matters for the result)
                resized = F.interpolate(feat, size=size, mode="bilinear", align_corners=True)
                x = x + self.lateral_convs[i](resized)
        for conv in self.convs:
            x = conv(x)
        return self.conv_logits(x), self.conv_embedding(x)

    def loss(self, semantic_pred: Tensor, sem_seg: Tensor) -> Tensor:
        """Weighted cross entropy against the padded semantic maps ``sem_seg`` (N, H, W), 255 = ignore.

        The maps are subsampled by ``label_scale`` with nearest neighbour (pixel (8i, 8j) at stride 8), and
        the mean runs over ALL pixels, ignored ones counting as zero (mmdet 3.x, ``avg_non_ignore=False``).
        """
        labels = F.interpolate(sem_seg[:, None].float(), scale_factor=self.label_scale, mode="nearest")
        labels = labels[:, 0].long()
        per_pixel = F.cross_entropy(semantic_pred, labels, ignore_index=SEM_IGNORE, reduction="none")
        return self.loss_weight * per_pixel.mean()
