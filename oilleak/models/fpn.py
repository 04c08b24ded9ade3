"""Feature Pyramid Network (Lin et al. 2017) as mmdet configures it for HTC.

C2..C5 -> 1x1 lateral convs -> top-down sum (nearest upsampling to the finer level's size) -> 3x3 output
convs -> P2..P5, and P6 = P5 subsampled by a stride-2 max-pool with kernel 1. No activations, no norms.
State-dict names follow mmdet (``lateral_convs.{i}.conv``, ``fpn_convs.{i}.conv``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from oilleak.models.layers import ConvBlock


class FPN(nn.Module):
    def __init__(self, *, in_channels: list[int], out_channels: int, num_outs: int = 5) -> None:
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs ({num_outs}) must be at least the number of inputs ({len(in_channels)})")
        self.in_channels = list(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvBlock(c, out_channels, 1, relu=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvBlock(out_channels, out_channels, 3, padding=1, relu=False) for _ in in_channels
        )
        for block in [*self.lateral_convs, *self.fpn_convs]:  # mmdet's FPN init
            nn.init.xavier_uniform_(block.conv.weight)
            nn.init.zeros_(block.conv.bias)

    def pyramid(self, feats: list[Tensor]) -> list[Tensor]:
        """[C2..C5] -> [P2..P(num_outs + 1)], each ``out_channels`` wide."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"FPN expects {len(self.in_channels)} feature maps, got {len(feats)}")
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            # upsample to the finer map's exact size (odd sizes make it not always 2x)
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], kernel_size=1, stride=2))
        return outs

    def forward(self, feats: list[Tensor], image: Tensor | None = None, consume_feats: bool = False) -> list[Tensor]:
        """``image`` and ``consume_feats`` are accepted so every neck is called alike (see ``RFP.forward``);
        unused here."""
        return self.pyramid(feats)
