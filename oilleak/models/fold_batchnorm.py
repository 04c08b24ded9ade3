"""Inference only: each backbone BatchNorm folded into the convolution before it.

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = a * x + b`` with ``a = gamma / sqrt(var +
eps)`` and ``b = beta - a * mean``. After a convolution with weight W and no bias that is the convolution
with weight ``a * W`` and bias ``b``: one pass over the activations instead of two. For a ConvAWS2d W is its
standardised weight (computed once here instead of at every call). SAC's BatchNorm is left alone: a context
branch sits between its deformable convolutions and the norm.

The folded model computes the same function up to float rounding (about 1e-7 relative in float32; the
fixtures' stage rows are checked with it in tests/test_fold_batchnorm.py). Its state dict no longer has the
BatchNorms, so fold a model that is only used to predict, after loading its weights.
"""

from __future__ import annotations

import torch
from torch import nn

from oilleak.models.layers import ConvAWS2d
from oilleak.models.resnet import Bottleneck, ResNet
from oilleak.models.sac import SAConv2d


@torch.no_grad()
def folded_conv(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` computing ``norm(conv(x))`` for ``norm`` in eval mode."""
    weight = conv.standardized_weight() if isinstance(conv, ConvAWS2d) else conv.weight
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    bias = norm.bias - scale * norm.running_mean
    if conv.bias is not None:
        bias = bias + scale * conv.bias
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True,
    ).to(device=weight.device, dtype=weight.dtype)
    fused.weight.copy_(weight * scale.view(-1, 1, 1, 1))
    fused.bias.copy_(bias)
    fused.requires_grad_(False)
    return fused


def fold_frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ResNet's BatchNorms (stem, blocks, shortcuts) into their convolutions, in place.

    The model must be in eval mode: a training BatchNorm normalises with the batch's statistics, which no
    fixed weight can reproduce. GroupNorm (``model.norm: group``) depends on each input and stays.
    """
    if model.training:
        raise ValueError("fold_frozen_batchnorm needs a model in eval() mode")
    for resnet in [m for m in model.modules() if isinstance(m, ResNet)]:
        _fold(resnet, "conv1", 1)
        for block in [m for m in resnet.modules() if isinstance(m, Bottleneck)]:
            _fold(block, "conv1", 1)
            if not isinstance(block.conv2, SAConv2d):
                _fold(block, "conv2", 2)
            _fold(block, "conv3", 3)
            if block.downsample is not None and isinstance(block.downsample[1], nn.BatchNorm2d):
                conv, norm = block.downsample
                block.downsample = nn.Sequential(folded_conv(conv, norm), nn.Identity())
    return model


def _fold(owner: nn.Module, conv_name: str, index: int) -> None:
    """``owner.<conv_name>`` and its norm (``bn<index>``, or ``gn<index>`` with GroupNorm) -> one conv."""
    norm_name = f"{owner.norm_abbr}{index}"
    norm = getattr(owner, norm_name)
    if isinstance(norm, nn.BatchNorm2d):
        setattr(owner, conv_name, folded_conv(getattr(owner, conv_name), norm))
        setattr(owner, norm_name, nn.Identity())
