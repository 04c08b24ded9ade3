"""Recursive Feature Pyramid (DetectoRS, Qiao et al. 2020, section 3) and its ASPP feedback module.

    P = FPN(backbone(image))                                   step 1
    repeat rfp_steps - 1 times, each with its own second ResNet:
        feedback = ASPP(P3), ASPP(P4), ASPP(P5)                one ASPP shared by levels and steps
        P' = FPN(rfp_backbone(image, feedback))                the SAME FPN weights as step 1
        P  = g * P' + (1 - g) * P,  g = sigmoid(rfp_weight(P'))   per level, incl. P6; rfp_weight shared

The second ResNet adds a 1x1 projection of each feedback map inside the first block of stages 2-4
(``resnet.Bottleneck``). State-dict names follow mmdet: ``rfp_modules.{k}``, ``rfp_aspp.aspp.{0..3}``,
``rfp_weight``, plus the FPN's own.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oilleak.models.fpn import FPN
from oilleak.models.resnet import ResNet


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling: parallel 1x1 / dilated 3x3 convs and an image-pooling branch, each
    followed by ReLU, concatenated on channels (``len(dilations) * out_channels`` outputs, same size).

    The last dilation must be 1: that branch is the global-average-pool one. Convs keep PyTorch's default
    init, as in mmdet (its RFP never initialises them, spec §10).
    """

    def __init__(self, *, in_channels: int, out_channels: int, dilations: tuple[int, ...] = (1, 3, 6, 1)) -> None:
        super().__init__()
        if dilations[-1] != 1:
            raise ValueError(f"the last ASPP dilation is the image-pooling branch and must be 1, got {dilations}")
        self.aspp = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 1 if d == 1 else 3, padding=0 if d == 1 else d, dilation=d)
            for d in dilations
        )

    def forward(self, x: Tensor) -> Tensor:
        *local_convs, pooled_conv = self.aspp
        outs = [F.relu(conv(x)) for conv in local_convs]
        pooled = F.relu(pooled_conv(F.adaptive_avg_pool2d(x, 1)))
        outs.append(pooled.expand(-1, -1, *x.shape[-2:]))
        return torch.cat(outs, dim=1)


class RFP(FPN):
    """An FPN whose output is fed back into a second backbone ``rfp_steps - 1`` times (see module docstring).

    ``rfp_backbone`` is the second ResNet (built with ``rfp_inplanes=out_channels``); further steps get copies
    of it (separate weights). ``forward`` needs the normalised ``image`` the first backbone saw.
    """

    def __init__(
        self,
        *,
        in_channels: list[int],
        out_channels: int,
        num_outs: int = 5,
        rfp_backbone: ResNet,
        aspp_out_channels: int,
        aspp_dilations: tuple[int, ...] = (1, 3, 6, 1),
        rfp_steps: int = 2,
    ) -> None:
        super().__init__(in_channels=in_channels, out_channels=out_channels, num_outs=num_outs)
        if rfp_steps < 2:
            raise ValueError(f"rfp_steps must be at least 2 (1 would be a plain FPN), got {rfp_steps}")
        if aspp_out_channels * len(aspp_dilations) != out_channels:
            raise ValueError(
                f"ASPP output ({len(aspp_dilations)} x {aspp_out_channels}) must match the pyramid width {out_channels}"
            )
        self.rfp_modules = nn.ModuleList([rfp_backbone] + [copy.deepcopy(rfp_backbone) for _ in range(rfp_steps - 2)])
        self.rfp_aspp = ASPP(in_channels=out_channels, out_channels=aspp_out_channels, dilations=tuple(aspp_dilations))
        self.rfp_weight = nn.Conv2d(out_channels, 1, 1)
        # gate sigmoid(0) = 0.5: the steps start out averaged
        nn.init.zeros_(self.rfp_weight.weight)
        nn.init.zeros_(self.rfp_weight.bias)

    def feedback(self, pyramid: list[Tensor]) -> list[Tensor]:
        """ASPP of P3, P4, P5: what stages 2, 3, 4 of the second ResNet receive (P2 and P6 feed nothing)."""
        return [self.rfp_aspp(p) for p in pyramid[1:4]]

    def forward(self, feats: list[Tensor], image: Tensor | None = None, consume_feats: bool = False) -> list[Tensor]:
        """``consume_feats``: empty the ``feats`` list once the first pyramid is built, so the first backbone's
        maps are freed before the second backbone runs (the detector's call; 129 MB at 1333x800)."""
        if image is None:
            raise ValueError("RFP needs the input image for its second backbone pass: call neck(feats, image=images)")
        pyramid = self.pyramid(feats)
        if consume_feats:
            feats.clear()
        for rfp_backbone in self.rfp_modules:
            recursive = self.pyramid(rfp_backbone(image, rfp_feats=self.feedback(pyramid)))
            # level by level, dropping each old and new level once fused: the peak holds two pyramids, not three
            for level in range(len(pyramid)):
                pyramid[level] = self._fuse(recursive[level], pyramid[level])
                recursive[level] = None
        return pyramid

    def _fuse(self, new: Tensor, old: Tensor) -> Tensor:
        gate = torch.sigmoid(self.rfp_weight(new))
        return gate * new + (1 - gate) * old
