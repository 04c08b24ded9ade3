"""RoIAlign (He et al. 2017) on CPU as two small matrix products per RoI, and its backward.

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

The map's gradient is the transpose, per RoI (:class:`SeparableRoIAlign`; RoIs get none, as in torchvision):

    grad_feat[c, y0:y1, x0:x1] += Wy.T @ grad_out[c] @ Wx

accumulated in place into the window by two GEMMs, where torchvision's CPU backward is again a scalar
single-threaded loop (with its forward, a quarter to two fifths of a CPU training step of the tiny presets).
CUDA, dtypes other than float32/64, ONNX export's tracing, RoIs that require grad, and
:func:`oilleak.models.deform_conv.reference_kernel` blocks run torchvision's op (and ``adaptive_avg_pool2d``
for the pooling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

from oilleak.models import deform_conv


def separable_applies(feat: Tensor, rois: Tensor) -> bool:
    """The matrix-product path runs on CPU for RoIs that need no gradient, outside ``reference_kernel`` and
    ONNX export's tracing (whose graph has ONNX's RoiAlign)."""
    return (
        not deform_conv.reference_only()
        and not torch.jit.is_tracing()
        and feat.device.type == "cpu"
        and feat.dtype in (torch.float32, torch.float64)
        and not deform_conv.needs_grad(rois)
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
    if deform_conv.needs_grad(*feats):
        return SeparableRoIAlign.apply(rois, levels, output_size, spatial_scales, size, *feats)
    plans = _plan(feats, rois, levels, output_size, spatial_scales, size)
    return _separable(feats, plans, len(rois), size)


class Window(NamedTuple):
    """The part of a map that one RoI reads, and its axis weights over it (:func:`axis_weights`)."""

    image: int
    rows: slice  # y0:y1
    cols: slice  # x0:x1
    weights_y: Tensor  # (size, y1 - y0)
    weights_x: Tensor  # (size, x1 - x0), contiguous


Plan = list[list[tuple[int, Window | None]]]  # per map: (output row, window) of each of its RoIs


def _plan(
    feats: Sequence[Tensor],
    rois: Tensor,
    levels: Tensor | None,
    output_size: int,
    spatial_scales: Sequence[float],
    size: int,
) -> Plan:
    """Where every RoI reads its map (levels None: all on feats[0]); window None: it samples nothing (output 0)."""
    plans = []
    for level, (feat, scale) in enumerate(zip(feats, spatial_scales)):
        members = torch.arange(len(rois)) if levels is None else (levels == level).nonzero().flatten()
        boxes = rois[members, 1:].to(feat.dtype) * scale - 0.5
        height, width = feat.shape[-2:]
        weights_y, lo_y, hi_y = axis_weights(boxes[:, 1], boxes[:, 3], output_size, height, size)
        weights_x, lo_x, hi_x = axis_weights(boxes[:, 0], boxes[:, 2], output_size, width, size)
        edges = zip(rois[members, 0].long().tolist(), lo_y.tolist(), hi_y.tolist(), lo_x.tolist(), hi_x.tolist())
        plan = []
        for k, (r, (image, y0, y1, x0, x1)) in enumerate(zip(members.tolist(), edges)):
            window = None
            if y0 < y1 and x0 < x1:
                y, x = slice(y0, y1), slice(x0, x1)
                window = Window(image, y, x, weights_y[k, :, y], weights_x[k, :, x].contiguous())
            plan.append((r, window))
        plans.append(plan)
    return plans


def _separable(feats: Sequence[Tensor], plans: Plan, num_rois: int, size: int) -> Tensor:
    """(num_rois, C, size, size): ``out[c] = Wy @ feat[c, window] @ Wx.T`` of every planned RoI."""
    # channels-last rows, so that a window of the map is one strided matrix (no copy for channels-last maps)
    out = feats[0].new_empty(num_rois, size, size, feats[0].shape[1])
    for feat, plan in zip(feats, plans):
        if not plan:
            continue
        table = feat.permute(0, 2, 3, 1).contiguous()
        for r, window in plan:
            if window is None:
                out[r].zero_()
                continue
            region = table[window.image, window.rows, window.cols]  # (h, w, C), a view
            rows = torch.mm(window.weights_y, region.reshape(region.shape[0], -1)).view(size, region.shape[1], -1)
            torch.matmul(window.weights_x, rows, out=out[r])  # (size, size, C)
    return out.permute(0, 3, 1, 2)


class SeparableRoIAlign(torch.autograd.Function):
    """:func:`roi_align_by_level`'s matrix products with the maps' gradient (module docstring); none for the
    RoIs. The op is linear in the maps, so the backward needs only the plan (a few numbers per RoI)."""

    @staticmethod
    def forward(
        ctx, rois: Tensor, levels: Tensor | None, output_size: int, spatial_scales: Sequence[float], size: int, *feats: Tensor
    ) -> Tensor:
        ctx.plans = _plan(feats, rois, levels, output_size, spatial_scales, size)
        ctx.shapes = [feat.shape for feat in feats]
        return _separable(feats, ctx.plans, len(rois), size)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_rows = grad_out.permute(0, 2, 3, 1).contiguous()  # (R, size, size, C), the forward's layout
        size = grad_rows.shape[1]
        grads = []
        for shape, plan, needed in zip(ctx.shapes, ctx.plans, ctx.needs_input_grad[5:]):
            if not needed:
                grads.append(None)
                continue
            n, channels, height, width = shape
            grad_table = grad_out.new_zeros(n, height, width, channels)
            for r, window in plan:
                if window is None:
                    continue
                # x first, (size, w, C); then the y GEMM adds straight into the window (h, w * C), a strided view
                cols = torch.matmul(window.weights_x.t(), grad_rows[r])
                region = grad_table[window.image, window.rows, window.cols]
                region.view(region.shape[0], -1).addmm_(window.weights_y.t(), cols.view(size, -1))
            grads.append(grad_table.permute(0, 3, 1, 2))
        return (None, None, None, None, None, *grads)


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
