"""RoIAlign (He et al. 2017) for CPU inference as two small matrix products per RoI.

mmdet configures RoIAlign with ``aligned=True`` and an adaptive sampling grid (``sampling_ratio=0``): bin
(i, j) of an RoI averages ``gh x gw`` bilinear samples, ``gh = ceil(roi_height / output_size)``. torchvision's
CPU kernel visits every (sample, channel) with a scalar, single-threaded loop, which made RoIAlign a third of
the RoI head's CPU time, most of it in the semantic branch's 14x14 RoIs on the stride-8 map (every proposal,
at every box stage, with up to ~60 samples per bin).

The samples of a bin form a product grid (gh rows x gw columns) and bilinear weights factor into a y part
and an x part, and so does the rule that zeroes a sample outside the map (y outside [-1, H] or x outside
[-1, W]). So each RoI's output is

    out[c] = Wy @ feat[c, y0:y1, x0:x1] @ Wx.T

with Wy (output_size, y1 - y0) holding, for each output row, the bilinear y weights of its samples summed and
divided by gh (Wx likewise): two GEMMs over the RoI's window instead of 4 * gh * gw * output_size^2 scalar
multiply-adds per channel. An average pool of the output (the semantic branch pools its 14x14 RoI features to
the box head's 7x7) is folded into Wy and Wx. The positions and bilinear weights are computed as torchvision
computes them; only the order of the sums differs (float rounding).

Training (autograd), CUDA, and :func:`oilleak.models.deform_conv.reference_kernel` blocks run torchvision's
op (and ``adaptive_avg_pool2d`` for the pooling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

from oilleak.models import deform_conv


def separable_applies(feat: Tensor, rois: Tensor) -> bool:
    """The matrix-product path runs on CPU without autograd, outside ``reference_kernel`` and ONNX export's
    tracing (whose graph has ONNX's RoiAlign)."""
    return (
        not deform_conv.reference_only()
        and not torch.jit.is_tracing()
        and feat.device.type == "cpu"
        and feat.dtype in (torch.float32, torch.float64)
        and not (torch.is_grad_enabled() and (feat.requires_grad or rois.requires_grad))
    )


def roi_align(feat: Tensor, rois: Tensor, output_size: int, spatial_scale: float, pooled_size: int | None = None) -> Tensor:
    """torchvision's ``roi_align(feat, rois, output_size, spatial_scale, sampling_ratio=0, aligned=True)``,
    then average-pooled to ``pooled_size`` (a divisor of ``output_size``) when given.

    feat (N, C, H, W); rois (R, 5) rows (image index, x1, y1, x2, y2) in input pixels. -> (R, C, s, s).
    """
    return roi_align_by_level([feat], rois, None, output_size, [spatial_scale], pooled_size)


def roi_align_by_level(
    feats: Sequence[Tensor],
    rois: Tensor,
    levels: Tensor | None,
    output_size: int,
    spatial_scales: Sequence[float],
    pooled_size: int | None = None,
) -> Tensor:
    """:func:`roi_align` of RoI r on ``feats[levels[r]]`` (at ``spatial_scales[levels[r]]``), in RoI order;
    ``levels`` None: every RoI on the one map in ``feats``."""
    size = pooled_size or output_size
    if output_size % size:
        raise ValueError(f"pooled_size {size} must divide output_size {output_size}")
    if levels is None and len(feats) != 1:
        raise ValueError("levels=None needs exactly one feature map")
    if not separable_applies(feats[0], rois):
        if levels is None:  # no reordering: a traced graph keeps the RoI count dynamic
            out = torchvision_roi_align(feats[0], rois, output_size, spatial_scales[0], 0, True)
        else:
            order, pooled = [], []
            for level, (feat, scale) in enumerate(zip(feats, spatial_scales)):
                members = (levels == level).nonzero().flatten()
                order.append(members)
                pooled.append(torchvision_roi_align(feat, rois[members], output_size, scale, 0, True))
            out = torch.cat(pooled)[torch.argsort(torch.cat(order))]
        return out if size == output_size else F.adaptive_avg_pool2d(out, size)
    # channels-last rows, so that a window of the map is one strided matrix (no copy for channels-last maps)
    out = feats[0].new_empty(len(rois), size, size, feats[0].shape[1])
    for level, (feat, scale) in enumerate(zip(feats, spatial_scales)):
        members = torch.arange(len(rois)) if levels is None else (levels == level).nonzero().flatten()
        if len(members):
            _separable_into(out, members, feat.permute(0, 2, 3, 1).contiguous(), rois[members], output_size, scale, size)
    return out.permute(0, 3, 1, 2)


def _separable_into(
    out: Tensor, members: Tensor, table: Tensor, rois: Tensor, output_size: int, spatial_scale: float, size: int
) -> None:
    """out[members[k]] (size, size, C) = RoIAlign of rois[k] on table (N, H, W, C)."""
    height, width, channels = table.shape[1:]
    boxes = rois[:, 1:].to(table.dtype) * spatial_scale - 0.5
    weights_y, lo_y, hi_y = axis_weights(boxes[:, 1], boxes[:, 3], output_size, height, size)
    weights_x, lo_x, hi_x = axis_weights(boxes[:, 0], boxes[:, 2], output_size, width, size)
    windows = zip(members.tolist(), rois[:, 0].long().tolist(), lo_y.tolist(), hi_y.tolist(), lo_x.tolist(), hi_x.tolist())
    for k, (r, image, y0, y1, x0, x1) in enumerate(windows):
        if y1 <= y0 or x1 <= x0:
            out[r].zero_()
            continue
        window = table[image, y0:y1, x0:x1].reshape(y1 - y0, -1)  # (h, w * C), a view
        rows = torch.mm(weights_y[k, :, y0:y1], window).view(size, x1 - x0, channels)
        torch.matmul(weights_x[k, :, x0:x1].contiguous(), rows, out=out[r])  # (size, size, C)


def axis_weights(start: Tensor, end: Tensor, output_size: int, length: int, pooled_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Along one axis of every RoI: (R, pooled_size, length) weights and each RoI's window [lo, hi).

    start, end: (R,) RoI edges in feature pixels, already shifted by -0.5 (aligned=True). A sample at
    position p (torchvision's rule): 0 if p < -1 or p > length; else p clamped to >= 0, its low neighbour
    floor(p) and high neighbour low + 1 with weights 1 - frac and frac, both the last row when low >= length - 1.
    """
    num_rois, dtype = len(start), start.dtype
    extent = end - start
    bin_size = extent / output_size
    grid = torch.ceil(extent / output_size).clamp_(min=0).long()  # samples per bin along this axis
    most = int(grid.max()) if num_rois else 0
    bins = torch.arange(output_size, dtype=dtype).view(1, -1, 1)
    steps = (torch.arange(most, dtype=dtype) + 0.5).view(1, 1, -1)
    bin_size, grid_f = bin_size.view(-1, 1, 1), grid.to(dtype).view(-1, 1, 1)
    # (R, output_size, most) positions, summed in torchvision's order
    position = (start.view(-1, 1, 1) + bins * bin_size) + steps * bin_size / grid_f.clamp(min=1)
    used = (torch.arange(most).view(1, 1, -1) < grid.view(-1, 1, 1)) & (position >= -1) & (position <= length)
    position = position.clamp(min=0)
    low = position.floor()
    at_edge = low >= length - 1
    low = torch.where(at_edge, low.new_tensor(length - 1), low)
    position = torch.where(at_edge, low, position)
    frac = position - low
    low = low.long()
    high = torch.where(at_edge, low, low + 1)
    scale = used.to(dtype) / grid_f.clamp(min=1)
    weights = torch.zeros(num_rois, output_size, length, dtype=dtype)
    weights.scatter_add_(2, low, (1 - frac) * scale)
    weights.scatter_add_(2, high, frac * scale)
    if pooled_size != output_size:
        merge = output_size // pooled_size
        weights = weights.view(num_rois, pooled_size, merge, length).sum(2) / merge
    # the window every sample of the RoI reads (all-zero RoIs get an empty window)
    touched = (weights != 0).any(1)
    lo = touched.int().argmax(1)
    hi = length - touched.flip(1).int().argmax(1)
    hi = torch.where(touched.any(1), hi, lo)
    return weights, lo, hi
