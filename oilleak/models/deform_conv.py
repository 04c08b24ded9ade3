"""Deformable convolution (Dai et al. 2017) for CPU inference: vectorised bilinear sampling, then one GEMM.

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

Only the inference path is replaced: with autograd, on CUDA or with groups, torchvision's op runs, and
inside :func:`reference_kernel` (a check that needs torchvision's exact float32 summation order).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
    """The vectorised path runs on CPU without autograd, for one offset group and one weight group."""
    return (
        not _reference_only
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and (x.requires_grad or offset.requires_grad or weight.requires_grad))
        and x.dtype in (torch.float32, torch.float64)
        and weight.shape[1] == x.shape[1]
        and offset.shape[1] == 2 * weight.shape[2] * weight.shape[3]
    )


def sampling_table(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N * (H + 2) * (W + 2), C): channels-last rows with a one-pixel zero border.

    The border holds the zeros that torchvision's kernel substitutes for neighbours outside the map.
    """
    n, c, h, w = x.shape
    table = x.new_zeros(n, h + 2, w + 2, c)
    table[:, 1:-1, 1:-1].copy_(x.permute(0, 2, 3, 1))
    return table.view(-1, c)


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
    in channels-last memory layout (the GEMM's natural output).
    """
    n, h, w = size
    out_channels, channels, kh, kw = weight.shape
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
    point = offset.view(n, taps, 2, ho, wo).permute(0, 3, 4, 1, 2).contiguous().add_(grid)
    inside = (point > -1).logical_and_(point < point.new_tensor([h, w])).all(dim=-1)
    low = point.floor()
    frac = point - low
    # Weights of the (low, high) neighbour along y and x, then their products in torchvision's order:
    # (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high).
    along = torch.stack((1 - frac, frac), dim=-1)  # (..., 2 axes, 2 neighbours)
    weights = (along[..., 0, :, None] * along[..., 1, None, :]).flatten(-2)
    weights.mul_(inside.unsqueeze(-1))
    # Row of the (y_low, x_low) neighbour in the bordered table; the other three are +1, +W+2, +W+3.
    row_len = w + 2
    low = low.long().add_(1)
    first = low[..., 0] * row_len + low[..., 1]
    first.mul_(inside).add_(torch.arange(n, device=device).view(n, 1, 1, 1) * ((h + 2) * row_len))
    rows = first.unsqueeze(-1) + first.new_tensor([0, 1, row_len, row_len + 1])

    columns = F.embedding_bag(
        rows.view(-1, 4), table, mode="sum", per_sample_weights=weights.view(-1, 4)
    ).view(n, ho * wo, taps * channels)
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, taps * channels)
    with torch.autocast(device.type, enabled=False):  # the input's dtype, as torchvision's kernel keeps it
        out = columns @ kernel.t()  # (N, Ho*Wo, O)
    return out.view(n, ho, wo, out_channels).permute(0, 3, 1, 2)


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
    n, _, h, w = x.shape
    return deform_conv2d_from_table(
        sampling_table(x), (n, h, w), offset, weight, stride=stride, padding=padding, dilation=dilation
    )
