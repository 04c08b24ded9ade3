"""Switchable Atrous Convolution (DetectoRS, Qiao et al. 2020, section 4).

A 3x3 conv that looks at its input twice, with dilation d and 3d, and mixes the two results per pixel with a
learned switch. Both looks are deformable convolutions whose offsets are predicted from the input; the
large-dilation look uses the same standardised weight plus a learned difference ``weight_diff``. Global
context is added to the input before and to the output after.

    x = x + pre_context(avgpool(x))
    a = avg_pool_5x5(reflect_pad_2(x))                       smoothed input for the switch and the offsets
    S = switch(a)                                            (N, 1, Ho, Wo), raw: no sigmoid (mmcv)
    out = S * deform(x, W, offset_s(a), d) + (1 - S) * deform(x, W + weight_diff, offset_l(a), 3d)
    out = out + post_context(avgpool(out))

W is the AWS-standardised weight (``layers.standardize_weight``). With the initial values (switch weight 0 and
bias 1, everything else 0) the module equals a plain 3x3 conv with W, so it can start from ImageNet weights.
Parameter names follow mmcv's ``SAConv2d`` so DetectoRS checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oilleak.errors import OilleakError
from oilleak.models.deform_conv import deform_conv2d, deform_conv2d_from_table, needs_grad, sampling_table, vectorised_applies
from oilleak.models.layers import ConvAWS2d

# The switch and offset input is smoothed by a 5x5 average over the reflect-padded map; reflection needs
# pad < size, so every SAC input must be at least this many pixels high and wide.
SWITCH_PAD = 2
MIN_INPUT_SIZE = SWITCH_PAD + 1


class SAConv2d(ConvAWS2d):
    """Switchable atrous 3x3 convolution with deformable offsets, no bias (as in DetectoRS' ResNet)."""

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.weight_diff = nn.Parameter(self.weight.new_zeros(self.weight.shape))
        self.switch = nn.Conv2d(in_channels, 1, 1, stride=stride)
        self.pre_context = nn.Conv2d(in_channels, in_channels, 1)
        self.post_context = nn.Conv2d(out_channels, out_channels, 1)
        # 18 = (dy, dx) for each of the 3x3 taps; one offset group.
        self.offset_s = nn.Conv2d(in_channels, 18, 3, padding=1, stride=stride)
        self.offset_l = nn.Conv2d(in_channels, 18, 3, padding=1, stride=stride)
        self.reset_extras()

    def reset_extras(self) -> None:
        """The identity init: switch = 1 everywhere, no context, no offsets, no weight difference."""
        nn.init.zeros_(self.weight_diff)
        nn.init.zeros_(self.switch.weight)
        nn.init.ones_(self.switch.bias)
        for conv in (self.pre_context, self.post_context, self.offset_s, self.offset_l):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] < MIN_INPUT_SIZE or x.shape[-1] < MIN_INPUT_SIZE:
            raise OilleakError(
                f"switchable atrous convolution got a {x.shape[-2]}x{x.shape[-1]} feature map; it needs at least "
                f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (a padded input image of at least 96x96 pixels for DetectoRS). "
                "Fix: resize images to a larger scale (data.scale)."
            )
        x = x + self.pre_context(F.adaptive_avg_pool2d(x, 1))
        smoothed = F.avg_pool2d(F.pad(x, (SWITCH_PAD,) * 4, mode="reflect"), kernel_size=5, stride=1)
        switch = self.switch(smoothed)

        offset_s, offset_l = self.offset_s(smoothed), self.offset_l(smoothed)
        if not offset_s.is_cuda and (torch.isnan(offset_s).any() or torch.isnan(offset_l).any()):
            # torchvision's CPU deform_conv2d indexes memory with floor(NaN) and crashes the process
            raise FloatingPointError(
                "NaN reached the offsets of a switchable atrous convolution: the weights or the input hold NaN "
                "(did training diverge? lower the learning rate or enable gradient clipping)"
            )
        # Deformable convolution runs in the input's dtype, but at least float32: under autocast half and
        # bfloat16 become float32 (torchvision's CPU kernel has no such version, and its CUDA autocast wrapper
        # casts to float32 too); float64 stays float64.
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, offset_s, offset_l = x.to(dtype), offset_s.to(dtype), offset_l.to(dtype)
        weight = self.standardized_weight().to(dtype)
        weight_large = weight + self.weight_diff.to(dtype)  # the difference is added after standardisation
        large_padding = tuple(3 * p for p in self.padding)
        large_dilation = tuple(3 * d for d in self.dilation)
        if vectorised_applies(x, offset_s, weight) and not needs_grad(x, offset_s, offset_l, weight, weight_large):
            # CPU inference: both looks sample the same input, so its sampling table is built once
            table, size = sampling_table(x), (x.shape[0], x.shape[2], x.shape[3])
            small = deform_conv2d_from_table(
                table, size, offset_s, weight, stride=self.stride, padding=self.padding, dilation=self.dilation
            )
            large = deform_conv2d_from_table(
                table, size, offset_l, weight_large, stride=self.stride, padding=large_padding, dilation=large_dilation
            )
        else:
            small = deform_conv2d(x, offset_s, weight, stride=self.stride, padding=self.padding, dilation=self.dilation)
            large = deform_conv2d(
                x, offset_l, weight_large, stride=self.stride, padding=large_padding, dilation=large_dilation
            )
        out = switch * small + (1 - switch) * large
        return out + self.post_context(F.adaptive_avg_pool2d(out, 1))
