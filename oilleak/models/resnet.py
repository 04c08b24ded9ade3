"""ResNet backbone (He et al. 2016), "pytorch" style, with DetectoRS' options.

The same class serves three roles:
- plain ResNet-50 for HTC (``use_aws=False``, no SAC);
- DetectoRS' first backbone (``use_aws=True``: every conv is a ConvAWS2d; ``stage_with_sac`` turns each block's
  3x3 conv in those stages into a Switchable Atrous Convolution);
- DetectoRS' second, recursive backbone (``rfp_inplanes`` set): the first block of stages 2-4 also adds a 1x1
  projection of the Recursive Feature Pyramid's feedback to its residual sum.

Module names reproduce torchvision's and mmdet's state-dict keys (``conv1``, ``bn1``, ``layer{1..4}.{b}.conv2``,
``downsample.0``, ``rfp_conv``), so both ImageNet and DetectoRS checkpoints load without renaming. With
``norm="group"`` (GroupNorm, Wu & He 2018, which normalises each image on its own and so trains from random
weights at any batch size) the norms are ``gn1``.. as in mmdet's GN configs.

Shapes: input (N, 3, H, W) -> C2..C5 at strides 4, 8, 16, 32 with ``4 * base_channels * 2**i`` channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from oilleak.models.layers import NORM_ABBR, ConvAWS2d, Norm, norm_layer
from oilleak.models.sac import SAConv2d

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
EXPANSION = 4  # bottleneck output channels = 4 * planes


def _conv(use_aws: bool, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    if use_aws:
        return ConvAWS2d(in_ch, out_ch, kernel, stride=stride, padding=padding)
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)


class _Norms:
    """``norm1``.. name the norm layers whatever their kind (``bn1`` or ``gn1``), as mmdet's ResNet does."""

    norm_abbr: str

    @property
    def norm1(self) -> nn.Module:
        return getattr(self, f"{self.norm_abbr}1")

    @property
    def norm2(self) -> nn.Module:
        return getattr(self, f"{self.norm_abbr}2")

    @property
    def norm3(self) -> nn.Module:
        return getattr(self, f"{self.norm_abbr}3")


class Bottleneck(_Norms, nn.Module):
    """1x1 -> 3x3 (stride here) -> 1x1, plus shortcut; optionally plus a projection of RFP feedback."""

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int,
        use_aws: bool,
        use_sac: bool,
        downsample: bool,
        rfp_inplanes: int | None = None,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        out_channels = planes * EXPANSION
        self.norm_abbr = NORM_ABBR[norm]
        self.conv1 = _conv(use_aws, in_channels, planes, 1)
        self.add_module(f"{self.norm_abbr}1", norm_layer(norm, planes))
        if use_sac:
            self.conv2 = SAConv2d(planes, planes, stride=stride)
        else:
            self.conv2 = _conv(use_aws, planes, planes, 3, stride=stride, padding=1)
        self.add_module(f"{self.norm_abbr}2", norm_layer(norm, planes))
        self.conv3 = _conv(use_aws, planes, out_channels, 1)
        self.add_module(f"{self.norm_abbr}3", norm_layer(norm, out_channels))
        self.downsample = (
            nn.Sequential(_conv(use_aws, in_channels, out_channels, 1, stride=stride), norm_layer(norm, out_channels))
            if downsample
            else None
        )
        # mmdet leaves this conv at PyTorch's default init (spec §10); it is trained from there.
        self.rfp_conv = nn.Conv2d(rfp_inplanes, out_channels, 1) if rfp_inplanes else None

    def forward(self, x: Tensor, rfp_feat: Tensor | None = None) -> Tensor:
        # In place where autograd allows it (no norm or conv needs its output for the backward pass):
        # fewer fresh activation-sized buffers, which cost page faults on CPU.
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = F.relu(self.norm2(self.conv2(out)), inplace=True)
        out = self.norm3(self.conv3(out))
        out += identity
        if rfp_feat is not None:
            out += self.rfp_conv(rfp_feat)  # feedback joins before the final ReLU (DetectoRS eq. 4)
        return F.relu(out, inplace=True)


class ResNet(_Norms, nn.Module):
    """Bottleneck ResNet returning C2..C5; see the module docstring for the DetectoRS options.

    ``frozen_stages``: the stem and the first ``frozen_stages`` stages get ``requires_grad=False`` and stay in
    eval mode (0: the stem only, -1: nothing). ``norm_eval``: every BatchNorm stays in eval mode in training
    (running statistics frozen), while the affine parameters of unfrozen stages still train. Both as in mmdet.
    """

    def __init__(
        self,
        *,
        depth: int = 50,
        base_channels: int = 64,
        use_aws: bool,
        stage_with_sac: Sequence[bool] = (False, False, False, False),
        frozen_stages: int = 1,
        norm_eval: bool = True,
        rfp_inplanes: int | None = None,
        norm: Norm = "batch",
    ) -> None:
        super().__init__()
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(f"ResNet depth {depth} is not supported; use one of {sorted(BLOCKS_PER_STAGE)}")
        blocks_per_stage = BLOCKS_PER_STAGE[depth]
        if len(stage_with_sac) != len(blocks_per_stage):
            raise ValueError(f"stage_with_sac needs {len(blocks_per_stage)} entries, got {tuple(stage_with_sac)}")
        if not -1 <= frozen_stages <= len(blocks_per_stage):
            raise ValueError(f"frozen_stages must be within -1..{len(blocks_per_stage)}, got {frozen_stages}")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.norm_abbr = NORM_ABBR[norm]

        self.conv1 = _conv(use_aws, 3, base_channels, 7, stride=2, padding=3)
        self.add_module(f"{self.norm_abbr}1", norm_layer(norm, base_channels))
        in_channels = base_channels
        self.out_channels: list[int] = []
        self.strides = [4, 8, 16, 32]
        for i, (num_blocks, use_sac) in enumerate(zip(blocks_per_stage, stage_with_sac)):
            planes = base_channels * 2**i
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(num_blocks):
                blocks.append(
                    Bottleneck(
                        in_channels,
                        planes,
                        stride=stride if b == 0 else 1,
                        use_aws=use_aws,
                        use_sac=use_sac,
                        downsample=b == 0,
                        # feedback enters the first block of every stage but the first
                        rfp_inplanes=rfp_inplanes if b == 0 and i > 0 else None,
                        norm=norm,
                    )
                )
                in_channels = planes * EXPANSION
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(in_channels)
        self._init_weights()
        self._freeze_stages()

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.out_channels))]

    def stem(self, x: Tensor) -> Tensor:
        """7x7/2 conv, BN, ReLU, 3x3/2 max-pool: (N, 3, H, W) -> (N, base_channels, H/4, W/4)."""
        return F.max_pool2d(F.relu(self.norm1(self.conv1(x))), kernel_size=3, stride=2, padding=1)

    def forward(self, x: Tensor, rfp_feats: Sequence[Tensor] | None = None) -> list[Tensor]:
        """x (N, 3, H, W) -> [C2, C3, C4, C5].

        rfp_feats: RFP feedback for stages 2, 3, 4 (one tensor each, ``rfp_inplanes`` channels at strides 8,
        16, 32), added in the first block of those stages. Only a ResNet built with ``rfp_inplanes`` takes it.
        """
        stages = self.stages()
        if rfp_feats is not None and (self.layer2[0].rfp_conv is None or len(rfp_feats) != len(stages) - 1):
            raise ValueError(
                f"rfp_feats needs a ResNet built with rfp_inplanes and {len(stages) - 1} tensors "
                f"(got {len(rfp_feats)} tensors for a ResNet built {'with' if self.layer2[0].rfp_conv is not None else 'without'} rfp_inplanes)"
            )
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(stages):
            first, *rest = stage
            x = first(x, None if rfp_feats is None or i == 0 else rfp_feats[i - 1])
            for block in rest:
                x = block(x)
            outs.append(x)
        return outs

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.BatchNorm2d):
                        module.eval()
        return self

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.conv1, self.norm1, *self.stages()[: self.frozen_stages]]

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            for param in module.parameters():
                param.requires_grad_(False)

    def _init_weights(self) -> None:
        """Used when not starting from ImageNet weights: Kaiming (fan_out) convs, unit norms (mmdet's default).

        Only the ResNet's own convs: SAC extras keep their identity init and ``rfp_conv`` PyTorch's default.
        ConvAWS gamma/beta are then matched to the Kaiming weights, as loading ImageNet weights does, so the
        network starts as the plain ResNet it was initialised as. (mmdet leaves gamma 1 / beta 0 here: every
        standardised kernel element then has unit variance, and with BatchNorm frozen (norm_eval) the
        activations overflow to NaN within the first backbone; measured on the full-size model.)
        """
        convs = [self.conv1]
        for stage in self.stages():
            for block in stage:
                convs += [block.conv1, block.conv2, block.conv3]
                if block.downsample is not None:
                    convs.append(block.downsample[0])
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(conv, ConvAWS2d):
                conv.match_gamma_beta_to_weight()
        for module in self.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
