"""Small building blocks: weight standardisation (ConvAWS2d), mmdet's "conv named .conv" block, the norm layers.

Adaptive Weight Standardisation (DetectoRS, Qiao et al. 2020, built on Weight Standardisation by Qiao et al.
2019): every output channel's kernel is standardised to zero mean and unit variance, then scaled and shifted by
two per-channel buffers. The buffers are not trained; they exist so that a conv initialised from ordinary
(non-standardised) weights can start out computing exactly what those weights compute.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Added to the per-channel variance before the square root (mmcv's value).
WS_EPS = 1e-5
# Group Normalization (Wu & He 2018) with 32 groups, as mmdetection's GN configs.
GN_GROUPS = 32

Norm = Literal["batch", "group"]
# mmcv's build_norm_layer names a norm by its kind ("bn1" / "gn1"), so mmdet's BN and GN checkpoints both load.
NORM_ABBR = {"batch": "bn", "group": "gn"}


def norm_layer(norm: Norm, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with 32 groups; narrower layers (the tiny presets' 16 channels) get as many
    groups as divide both, so a group never spans channels it cannot hold."""
    if norm == "group":
        return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)
    return nn.BatchNorm2d(channels)


def channel_mean_std(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(O, I, kh, kw) -> per output channel ``mean`` and ``sqrt(var + eps)``, each (O, 1, 1, 1).

    Statistics run over the I*kh*kw elements of each output channel; the variance is the unbiased one
    (divides by n - 1), as in mmcv. Standardising and matching gamma / beta share it, so that a matched conv
    reproduces its weight exactly.
    """
    flat = weight.flatten(1)
    return flat.mean(dim=1).view(-1, 1, 1, 1), torch.sqrt(flat.var(dim=1) + WS_EPS).view(-1, 1, 1, 1)


def standardize_weight(weight: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``gamma * (W - mean) / sqrt(var + eps) + beta`` per output channel (see :func:`channel_mean_std`).

    weight (O, I, kh, kw); gamma, beta (O, 1, 1, 1).
    """
    mean, std = channel_mean_std(weight)
    return gamma * ((weight - mean) / std) + beta


class ConvAWS2d(nn.Conv2d):
    """``nn.Conv2d`` that convolves with its standardised weight (see :func:`standardize_weight`).

    Buffers ``weight_gamma`` (1 at init) and ``weight_beta`` (0) are saved in the state dict, as in mmdet
    checkpoints. A state dict that has the ``weight`` but neither buffer (ImageNet weights of a plain conv)
    gets them derived from that weight on load, by any ``load_state_dict``: see ``_load_from_state_dict``.
    """

    # 2: the state dict holds weight_gamma / weight_beta, and loading a weight without them derives them
    _version = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias
        )
        self.register_buffer("weight_gamma", torch.ones(out_channels, 1, 1, 1))
        self.register_buffer("weight_beta", torch.zeros(out_channels, 1, 1, 1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        buffers = (prefix + "weight_gamma", prefix + "weight_beta")
        if prefix + "weight" in state_dict and not any(key in state_dict for key in buffers):
            # a plain conv's weight: start from gamma = std, beta = mean so the standardised conv computes
            # what that conv computed (as mmcv's ConvAWS2d does); the buffers are then not missing
            self.match_gamma_beta_to_weight()
            missing_keys[:] = [key for key in missing_keys if key not in buffers]

    def standardized_weight(self) -> Tensor:
        return standardize_weight(self.weight, self.weight_gamma, self.weight_beta)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.no_grad()
    def match_gamma_beta_to_weight(self) -> None:
        """Set gamma = std and beta = mean of the current weight, so the standardised weight equals it.

        This is how mmdet starts a ConvAWS from ImageNet weights (which have no gamma/beta): the network
        first computes exactly what the pretrained one computes, then trains in the standardised form.
        """
        mean, std = channel_mean_std(self.weight)
        self.weight_beta.copy_(mean)
        self.weight_gamma.copy_(std)


class ConvBlock(nn.Module):
    """A conv kept under the attribute ``conv``, optionally GroupNorm (``gn``), optionally ReLU.

    This reproduces the state-dict layout of mmcv's ``ConvModule`` (``...lateral_convs.0.conv.weight``,
    ``...convs.0.gn.weight``; the conv has no bias when a norm follows), so mmdet checkpoints load without
    renaming, and its init: Kaiming normal (fan_out, relu) weights, zero bias.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0, relu: bool = True,
        group_norm: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=not group_norm)
        self.gn = norm_layer("group", out_channels) if group_norm else None
        self.relu = relu
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        return F.relu(x) if self.relu else x
