"""Deformable convolution (Dai et al. 2017) on CPU: vectorised bilinear sampling, then one GEMM; and its backward.

torchvision's CPU ``deform_conv2d`` samples every (channel, tap, output pixel) with a scalar loop, which is
most of DetectoRS' CPU time. This computes the same thing with a few tensor ops:

    p = (out_y * stride - pad + i * dilation + offset_y,  out_x * stride - pad + j * dilation + offset_x)
    column[pixel, tap, :] = sum over the 4 neighbours q of p:  bilinear_weight(p, q) * x[:, q]
    out[pixel, :] = column[pixel] @ weight  (weight laid out (tap, in_channel) x out_channel)

with torchvision's edge rule: a point with y <= -1, y >= H, x <= -1 or x >= W samples 0, and a neighbour
outside the map contributes 0. The input is copied once into a zero-bordered channels-last table, so each
neighbour is one contiguous row of channels; ``embedding_bag`` gathers and weights the four rows of every
(pixel, tap) in one pass. The positions and weights are computed exactly as torchvision computes them; only
the order of the final sums differs (float rounding). Switchable atrous convolution samples the same input
twice (dilation d and 3d), so the table is built once and shared (:func:`sampling_table`).

Training uses the same sampling (:class:`DeformConv2dFunction`); its backward is the transpose of each step,

    grad_weight = grad_out.T @ column;  grad_column = grad_out @ weight
    grad_x[q] += bilinear_weight(p, q) * grad_column[pixel, tap]            (embedding_bag's backward)
    grad_offset_y[pixel, tap] = sum_q d bilinear_weight(p, q) / dy * (x[q] . grad_column[pixel, tap])   (likewise x)

which is torchvision's gradient (its coordinate weights, including a point exactly on -1) without its scalar
per-element loops, which were 80 % of a CPU training step of the tiny preset. On CUDA, with groups, and inside :func:`reference_kernel`
(a check that needs torchvision's exact float32 summation order) torchvision's op runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d


_reference_only = False


@contextmanager
def reference_kernel() -> Iterator[None]:
    """Run torchvision's kernels (deformable convolution, RoIAlign) everywhere inside this block (their float32
    rounding, bit for bit)."""
    global _reference_only
    before, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = before


def reference_only() -> bool:
    """Inside :func:`reference_kernel`."""
    return _reference_only


def vectorised_applies(x: Tensor, offset: Tensor, weight: Tensor) -> bool:
    """The vectorised path runs on CPU, for one offset group and one weight group, outside ONNX export's
    tracing (whose graph has ONNX's DeformConv)."""
    return (
        not _reference_only
        and not torch.jit.is_tracing()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and weight.shape[1] == x.shape[1]
        and offset.shape[1] == 2 * weight.shape[2] * weight.shape[3]
    )


def needs_grad(*tensors: Tensor) -> bool:
    """Autograd will record an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def sampling_table(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N * (H + 2) * (W + 2), C): channels-last rows with a one-pixel zero border.

    The border holds the zeros that torchvision's kernel substitutes for neighbours outside the map.
    """
    n, c, h, w = x.shape
    table = x.new_zeros(n, h + 2, w + 2, c)
    table[:, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 1))
    return table.view(-1, c)


@dataclass
class SamplingPlan:
    """Where every (pixel, tap) of a deformable convolution samples its input's table.

    rows (N, Ho, Wo, taps, 4): table rows of the four neighbours, in torchvision's order (y_low, x_low),
    (y_low, x_high), (y_high, x_low), (y_high, x_high); weights: their bilinear weights (0 outside the edge
    rule); frac (N, Ho, Wo, taps, 2): the fractional (y, x) part; reach: the points whose neighbours are
    read (-1 <= y < H and -1 <= x < W; a point exactly on -1 samples 0 but has an offset gradient in
    torchvision, from its neighbours on row or column 0).
    """

    rows: Tensor
    weights: Tensor
    frac: Tensor
    reach: Tensor

    def sample(self, table: Tensor, weights: Tensor | None = None) -> Tensor:
        """(N * Ho * Wo * taps, C): every point's neighbours weighted by ``weights`` (default: the bilinear
        ones; the backward passes them as a leaf to get their gradient)."""
        weights = self.weights if weights is None else weights
        return F.embedding_bag(self.rows.view(-1, 4), table, mode="sum", per_sample_weights=weights.reshape(-1, 4))


def sampling_plan(
    size: tuple[int, int, int],
    offset: Tensor,
    kernel_size: tuple[int, int],
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> SamplingPlan:
    """The plan for an input of size (N, H, W), offset (N, 2*kh*kw, Ho, Wo) as (dy, dx) per tap."""
    n, h, w = size
    kh, kw = kernel_size
    taps = kh * kw
    ho, wo = offset.shape[-2:]
    dtype, device = offset.dtype, offset.device

    # Integer part of each sampling position, (Ho, Wo, taps, 2) as (y, x); exact in float.
    tap_y = torch.arange(kh, device=device).repeat_interleave(kw) * dilation[0]
    tap_x = torch.arange(kw, device=device).repeat(kh) * dilation[1]
    out_y = torch.arange(ho, device=device) * stride[0] - padding[0]
    out_x = torch.arange(wo, device=device) * stride[1] - padding[1]
    grid = torch.stack(
        torch.broadcast_tensors(out_y.view(ho, 1, 1) + tap_y, out_x.view(1, wo, 1) + tap_x), dim=-1
    ).to(dtype)
    # (N, Ho, Wo, taps, 2): the position plus its learned offset, one rounding as in torchvision
    point = offset.detach().view(n, taps, 2, ho, wo).permute(0, 3, 4, 1, 2).contiguous().add_(grid)
    below_end = point < point.new_tensor([h, w])
    inside = (point > -1).logical_and_(below_end).all(dim=-1)
    reach = (point >= -1).logical_and_(below_end).all(dim=-1)
    low = point.floor()
    frac = point - low
    # Weights of the (low, high) neighbour along y and x, then their products in torchvision's order.
    along = torch.stack((1 - frac, frac), dim=-1)  # (..., 2 axes, 2 neighbours)
    weights = (along[..., 0, :, None] * along[..., 1, None, :]).flatten(-2)
    weights.mul_(inside.unsqueeze(-1))
    # Row of the (y_low, x_low) neighbour in the bordered table; the other three are +1, +W+2, +W+3.
    row_len = w + 2
    low = low.long().add_(1)
    first = low[..., 0] * row_len + low[..., 1]
    first.mul_(reach).add_(torch.arange(n, device=device).view(n, 1, 1, 1) * ((h + 2) * row_len))
    rows = first.unsqueeze(-1) + first.new_tensor([0, 1, row_len, row_len + 1])
    return SamplingPlan(rows, weights, frac, reach)


def _kernel_matrix(weight: Tensor) -> Tensor:
    """(O, C, kh, kw) -> (O, taps * C), the columns' (tap, channel) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def _conv_from_columns(columns: Tensor, weight: Tensor, size: tuple[int, int, int]) -> Tensor:
    """(N * Ho * Wo * taps, C) columns @ weight -> (N, O, Ho, Wo) in channels-last memory layout."""
    n, ho, wo = size
    out_channels = weight.shape[0]
    kernel = _kernel_matrix(weight)
    with torch.autocast(columns.device.type, enabled=False):  # the input's dtype, as torchvision's kernel keeps it
        out = columns.view(n * ho * wo, -1) @ kernel.t()  # (N*Ho*Wo, O)
    return out.view(n, ho, wo, out_channels).permute(0, 3, 1, 2)


def deform_conv2d_from_table(
    table: Tensor,
    size: tuple[int, int, int],
    offset: Tensor,
    weight: Tensor,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """Deformable convolution of the input behind ``table`` (:func:`sampling_table`); size = (N, H, W).

    offset (N, 2*kh*kw, Ho, Wo) as (dy, dx) per tap; weight (O, C, kh, kw); no bias. Returns (N, O, Ho, Wo)
    in channels-last memory layout (the GEMM's natural output). No autograd: see :class:`DeformConv2dFunction`.
    """
    plan = sampling_plan(size, offset, weight.shape[-2:], stride=stride, padding=padding, dilation=dilation)
    return _conv_from_columns(plan.sample(table), weight, (size[0], *offset.shape[-2:]))


class DeformConv2dFunction(torch.autograd.Function):
    """The vectorised deformable convolution with its backward (module docstring). Inputs are saved, and the
    plan and columns recomputed in the backward, so training holds no more memory than torchvision's op."""

    @staticmethod
    def forward(ctx, x: Tensor, offset: Tensor, weight: Tensor, stride, padding, dilation) -> Tensor:
        ctx.save_for_backward(x, offset, weight)
        ctx.geometry = {"stride": stride, "padding": padding, "dilation": dilation}
        n, _, h, w = x.shape
        return deform_conv2d_from_table(sampling_table(x), (n, h, w), offset, weight, **ctx.geometry).contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, offset, weight = ctx.saved_tensors
        n, channels, h, w = x.shape
        out_channels, _, kh, kw = weight.shape
        ho, wo = offset.shape[-2:]
        table = sampling_table(x)
        plan = sampling_plan((n, h, w), offset, (kh, kw), **ctx.geometry)
        grad = grad_out.permute(0, 2, 3, 1).reshape(n * ho * wo, out_channels)
        grad_columns = (grad @ _kernel_matrix(weight)).view(-1, channels)  # (N*Ho*Wo*taps, C)

        # The sampling's own backward (embedding_bag's kernels) gives the table's gradient and, per neighbour,
        # table[row] . grad_column: the gradient of its bilinear weight.
        with torch.enable_grad():
            leaf_table = table.requires_grad_()
            leaf_weights = plan.weights.reshape(-1, 4).requires_grad_()
            columns = plan.sample(leaf_table, leaf_weights)
            grad_table, grad_weights = torch.autograd.grad(columns, (leaf_table, leaf_weights), grad_columns)
        grad_weight = (grad.t() @ columns.detach().view(n * ho * wo, -1)).view(out_channels, kh, kw, channels)
        grad_x = grad_table.view(n, h + 2, w + 2, channels)[:, 1:-1, 1:-1].permute(0, 3, 1, 2)
        # chain rule through the bilinear weights: d weight / dy and d weight / dx of the four neighbours
        fy, fx = plan.frac.view(-1, 2).unbind(-1)
        d_dy = torch.stack((fx - 1, -fx, 1 - fx, fx), dim=-1)
        d_dx = torch.stack((fy - 1, 1 - fy, -fy, fy), dim=-1)
        along = [(grad_weights * d).sum(-1) for d in (d_dy, d_dx)]
        grad_offset = torch.stack(along, dim=-1).mul_(plan.reach.view(-1, 1)).view(n, ho, wo, kh * kw, 2)
        grad_offset = grad_offset.permute(0, 3, 4, 1, 2).reshape(n, 2 * kh * kw, ho, wo)
        return grad_x, grad_offset, grad_weight.permute(0, 3, 1, 2), None, None, None


def deform_conv2d(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """``torchvision.ops.deform_conv2d`` (no bias, no mask), vectorised where :func:`vectorised_applies`."""
    if not vectorised_applies(x, offset, weight):
        return torchvision_deform_conv2d(x, offset, weight, stride=stride, padding=padding, dilation=dilation)
    if needs_grad(x, offset, weight):
        return DeformConv2dFunction.apply(x, offset, weight, stride, padding, dilation)
    n, _, h, w = x.shape
    return deform_conv2d_from_table(
        sampling_table(x), (n, h, w), offset, weight, stride=stride, padding=padding, dilation=dilation
    )
