"""The vectorised CPU deformable convolution against torchvision's (the reference kernel mmcv also matches)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from oilleak.models.deform_conv import deform_conv2d, reference_kernel, vectorised_applies
from oilleak.models.sac import SAConv2d

# float32: the sampled values are computed as torchvision computes them; only the GEMM's summation order
# differs. float64 leaves ~1e-16 of that.
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-13}


def random_case(dtype: torch.dtype, stride: int, dilation: int, offset_scale: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 13, 17, generator=generator, dtype=dtype)
    height_out = (13 + 2 * dilation - 2 * dilation - 1) // stride + 1
    width_out = (17 + 2 * dilation - 2 * dilation - 1) // stride + 1
    # offsets large enough that many points leave the map, cross its border or land beyond the -1/H edge
    offset = torch.randn(2, 18, height_out, width_out, generator=generator, dtype=dtype) * offset_scale
    weight = torch.randn(4, 5, 3, 3, generator=generator, dtype=dtype)
    return x, offset, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 1), (1, 3), (2, 3)])
@pytest.mark.parametrize("offset_scale", [0.0, 0.7, 6.0])
def test_equals_torchvision(dtype, stride, dilation, offset_scale):
    x, offset, weight = random_case(dtype, stride, dilation, offset_scale)
    args = {"stride": (stride, stride), "padding": (dilation, dilation), "dilation": (dilation, dilation)}
    expected = torchvision_deform_conv2d(x, offset, weight, **args)
    got = deform_conv2d(x, offset, weight, **args)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * expected.abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_points_on_the_edges(dtype):
    """Points exactly at -1, at 0, on integers, at H-1 and just inside/outside H: torchvision's edge rule."""
    x = torch.randn(1, 3, 6, 7, dtype=dtype)
    weight = torch.randn(2, 3, 3, 3, dtype=dtype)
    # every output pixel samples (with padding 1, tap (0, 0) of pixel (0, 0) sits at (-1, -1) before offsets)
    edges = torch.tensor([-1.0, -0.5, 0.0, 1.0, 4.5, 5.0, 5.5, 6.0, 6.0 - 1e-6, 7.0, -1.0 + 1e-6], dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    offset = edges[torch.randint(len(edges), (1, 18, 6, 7), generator=generator)]
    args = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
    expected = torchvision_deform_conv2d(x, offset, weight, **args)
    torch.testing.assert_close(deform_conv2d(x, offset, weight, **args), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


# float64 gradients: the same sums in another order; float32 ones scatter-add in another order too
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}


def gradients(conv, x, offset, weight, upstream, args) -> list[torch.Tensor]:
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, offset, weight)]
    conv(*inputs, **args).backward(upstream)
    return [t.grad for t in inputs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 3)])
@pytest.mark.parametrize("offset_scale", [0.7, 6.0])
def test_gradients_equal_torchvision(dtype, stride, dilation, offset_scale):
    """Training: the vectorised backward gives torchvision's gradients for input, offsets and weight."""
    x, offset, weight = random_case(dtype, stride, dilation, offset_scale, seed=1)
    args = {"stride": (stride, stride), "padding": (dilation, dilation), "dilation": (dilation, dilation)}
    upstream = torch.randn(torchvision_deform_conv2d(x, offset, weight, **args).shape, dtype=dtype)
    expected = gradients(torchvision_deform_conv2d, x, offset, weight, upstream, args)
    got = gradients(deform_conv2d, x, offset, weight, upstream, args)
    for name, a, b in zip(("input", "offset", "weight"), got, expected):
        tol = GRAD_TOLERANCE[dtype]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max(), msg=lambda m, name=name: f"{name}: {m}")


def test_gradients_on_the_edges():
    """Points at -1, 0, integers and H-1 (the edge rule and floor's kinks) in float64."""
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    weight = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    edges = torch.tensor([-1.0, -0.5, 0.0, 1.0, 4.5, 5.0, 5.5, 6.0, 7.0, -1.0 + 1e-6, 0.25], dtype=torch.float64)
    generator = torch.Generator().manual_seed(4)
    offset = edges[torch.randint(len(edges), (1, 18, 6, 7), generator=generator)]
    args = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
    upstream = torch.randn(1, 2, 6, 7, dtype=torch.float64)
    expected = gradients(torchvision_deform_conv2d, x, offset, weight, upstream, args)
    for a, b in zip(gradients(deform_conv2d, x, offset, weight, upstream, args), expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    """The backward is the derivative of the forward (finite differences, float64, points away from kinks)."""
    x, offset, weight = random_case(torch.float64, 1, 1, 0.7, seed=2)
    x, offset, weight = x[:1, :2, :5, :6], offset[:1, :, :5, :6] + 0.123, weight[:2, :2]
    args = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1)}
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, offset, weight)]
    assert torch.autograd.gradcheck(lambda a, b, c: deform_conv2d(a, b, c, **args), inputs)


def test_reference_kernel_keeps_torchvision():
    x, offset, weight = random_case(torch.float32, 1, 1, 1.0)
    assert vectorised_applies(x, offset, weight)
    with reference_kernel():
        assert not vectorised_applies(x, offset, weight)


@pytest.mark.parametrize("stride", [1, 2])
def test_sac_is_the_same_with_either_kernel(stride):
    """SAConv2d with trained-looking extras: the shared-table path at inference equals the autograd path."""
    torch.manual_seed(0)
    sac = SAConv2d(6, 6, stride=stride)
    with torch.no_grad():
        for parameter in sac.parameters():
            parameter.normal_(std=0.3)
    x = torch.randn(1, 6, 15, 19)
    reference = sac(x).detach()  # parameters require grad: the autograd function
    with torch.no_grad():
        fast = sac(x)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max())
