"""ONNX translations for the torchvision ops the detector uses (TorchScript exporter).

torchvision registers ``nms`` (-> ``NonMaxSuppression``) and ``roi_align`` (-> ``RoiAlign``; ``aligned=True``
needs opset 16, ``coordinate_transformation_mode="half_pixel"``) itself when it is imported. It has none for
``deform_conv2d``, which switchable atrous convolution uses: ONNX has ``DeformConv`` since opset 19, with the
same offset layout ((dy, dx) per kernel tap, offset groups outermost), so the translation is one node.
"""

from __future__ import annotations

import torch
from torch.onnx import symbolic_helper

DEFORM_CONV_OPSET = 19  # first opset with DeformConv
ROI_ALIGN_OPSET = 16  # first opset whose RoiAlign has half_pixel (torchvision's aligned=True)


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "i", "i", "i", "i", "i", "i", "b")
def _deform_conv2d(g, x, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups, offset_groups, use_mask):
    inputs = [x, weight, offset, bias] + ([mask] if use_mask else [])
    return g.op(
        "DeformConv",
        *inputs,
        strides_i=[stride_h, stride_w],
        pads_i=[pad_h, pad_w, pad_h, pad_w],
        dilations_i=[dil_h, dil_w],
        group_i=groups,
        offset_group_i=offset_groups,
    )


def register() -> None:
    """Make ``torch.onnx.export`` translate torchvision's deformable convolution (idempotent)."""
    import torchvision.ops  # noqa: F401  registers nms and roi_align

    torch.onnx.register_custom_op_symbolic("torchvision::deform_conv2d", _deform_conv2d, DEFORM_CONV_OPSET)
