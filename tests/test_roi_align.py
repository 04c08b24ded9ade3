"""The separable CPU RoIAlign and its backward against a hand-computed case and torchvision's kernel (which mmcv's
equals)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align as torchvision_roi_align

from oilleak.models.deform_conv import reference_kernel
from oilleak.models.roi_align import roi_align, roi_align_by_level, separable_applies

# the positions and bilinear weights are torchvision's; only the order of the sums differs
TOLERANCE = {torch.float32: 2e-6, torch.float64: 1e-13}


def random_rois(num: int, image_size: tuple[int, int], images: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """Boxes of every size, some reaching past the image (up to the -1 edge and beyond), some degenerate."""
    height, width = image_size
    centre = torch.rand(num, 2, generator=generator, dtype=dtype) * torch.tensor([width, height], dtype=dtype) * 1.3 - 10
    half = torch.rand(num, 2, generator=generator, dtype=dtype) ** 2 * torch.tensor([width, height], dtype=dtype) * 0.6
    half[:3] = 0  # zero-size RoIs: no samples, output 0
    boxes = torch.cat([centre - half, centre + half], dim=1)
    index = torch.randint(images, (num, 1), generator=generator).to(dtype)
    return torch.cat([index, boxes], dim=1)


def test_linear_map_gives_the_mean_sample_position():
    """On f(y, x) = 3y + 2x + 1, bilinear sampling is exact, so each bin is f at its mean sample position.

    RoI (x1, y1, x2, y2) = (4, 2, 16, 10) at scale 1/2 -> (1.5, 0.5, 7.5, 4.5) after aligned's -0.5: bins of
    3 x 2 px (2 x 2 output), sampled 3 x 2 times (ceil(3), ceil(2)); mean position = the bin's centre.
    """
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(10.0), indexing="ij")
    feat = (3 * ys + 2 * xs + 1).view(1, 1, 8, 10)
    rois = torch.tensor([[0.0, 4.0, 2.0, 16.0, 10.0]])
    centres_y, centres_x = torch.tensor([1.5, 3.5]), torch.tensor([3.0, 6.0])
    expected = 3 * centres_y.view(2, 1) + 2 * centres_x.view(1, 2) + 1
    with torch.no_grad():
        torch.testing.assert_close(roi_align(feat, rois, 2, 0.5)[0, 0], expected)
        # the 2x2 output pooled to 1x1: f at the RoI's centre
        torch.testing.assert_close(roi_align(feat, rois, 2, 0.5, pooled_size=1)[0, 0, 0, 0], torch.tensor(3 * 2.5 + 2 * 4.5 + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("output_size", "pooled_size"), [(7, None), (14, None), (14, 7)])
def test_equals_torchvision(dtype, channels_last, output_size, pooled_size):
    generator = torch.Generator().manual_seed(output_size + channels_last)
    feat = torch.randn(2, 6, 23, 31, generator=generator, dtype=dtype)
    if channels_last:
        feat = feat.contiguous(memory_format=torch.channels_last)
    rois = random_rois(40, (23 * 8, 31 * 8), 2, generator, dtype)
    expected = torchvision_roi_align(feat, rois, output_size, 1 / 8, 0, True)
    if pooled_size:
        expected = F.adaptive_avg_pool2d(expected, pooled_size)
    with torch.inference_mode():
        got = roi_align(feat, rois, output_size, 1 / 8, pooled_size)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * expected.abs().max())


def test_levels_in_roi_order():
    generator = torch.Generator().manual_seed(5)
    feats = [torch.randn(1, 4, 40 // s, 48 // s, generator=generator) for s in (1, 2, 4)]
    rois = random_rois(30, (160, 192), 1, generator, torch.float32)
    levels = torch.randint(3, (30,), generator=generator)
    scales = [1 / 4, 1 / 8, 1 / 16]
    with torch.no_grad():
        got = roi_align_by_level(feats, rois, levels, 7, scales)
    for r in range(30):
        expected = torchvision_roi_align(feats[levels[r]], rois[r : r + 1], 7, scales[levels[r]], 0, True)
        torch.testing.assert_close(got[r : r + 1], expected, rtol=2e-6, atol=2e-6 * expected.abs().max())


def torchvision_by_level(feats, rois, levels, output_size, scales, pooled_size=None):
    """The reference: torchvision's op per RoI on its level (a list), then adaptive_avg_pool2d."""
    out = torch.cat(
        [
            torchvision_roi_align(feats[level], rois[r : r + 1], output_size, scales[level], 0, True)
            for r, level in enumerate(levels)
        ]
    )
    return F.adaptive_avg_pool2d(out, pooled_size) if pooled_size else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("output_size", "pooled_size"), [(7, None), (14, 7)])
def test_map_gradient_equals_torchvision(dtype, output_size, pooled_size):
    """Two images, RoIs past every edge and of zero size; the semantic branch's pooled 14 -> 7 too."""
    generator = torch.Generator().manual_seed(output_size)
    feat = torch.randn(2, 6, 23, 31, generator=generator, dtype=dtype, requires_grad=True)
    rois = random_rois(40, (23 * 8, 31 * 8), 2, generator, dtype)
    out = roi_align(feat, rois, output_size, 1 / 8, pooled_size)
    assert type(out.grad_fn).__name__ == "SeparableRoIAlignBackward"
    grad_out = torch.randn(out.shape, generator=generator, dtype=dtype)
    (got,) = torch.autograd.grad(out, feat, grad_out)
    reference = torchvision_by_level([feat], rois, [0] * len(rois), output_size, [1 / 8], pooled_size)
    (expected,) = torch.autograd.grad(reference, feat, grad_out)
    assert expected.abs().sum() > 0 and (expected == 0).any()  # some of the map is read, some is not
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max())


def test_level_gradients_equal_torchvision():
    """Each level's map gets the gradient of its own RoIs only; a level with no RoIs gets zeros."""
    generator = torch.Generator().manual_seed(7)
    feats = [
        torch.randn(2, 4, 40 // s, 48 // s, generator=generator, dtype=torch.float64, requires_grad=True) for s in (1, 2, 4, 8)
    ]
    rois = random_rois(30, (160, 192), 2, generator, torch.float64)
    levels = torch.randint(3, (30,), generator=generator)  # none on the last level
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    out = roi_align_by_level(feats, rois, levels, 7, scales)
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    got = torch.autograd.grad(out, feats, grad_out)
    expected = torch.autograd.grad(torchvision_by_level(feats, rois, levels.tolist(), 7, scales), feats, grad_out, allow_unused=True)
    for level in range(3):
        torch.testing.assert_close(got[level], expected[level], rtol=1e-12, atol=1e-12 * expected[level].abs().max())
    assert torch.equal(got[3], torch.zeros_like(feats[3]))


def test_gradcheck():
    generator = torch.Generator().manual_seed(3)
    feat = torch.randn(2, 2, 9, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    rois = random_rois(6, (36, 44), 2, generator, torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align(f, rois, 4, 0.25, 2), (feat,))


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")  # jit.trace: ONNX export's tracer
def test_training_takes_the_separable_path_and_reference_keeps_torchvision():
    """With autograd on the map (training) the matrix products run; with RoIs that require grad, in ONNX tracing
    and inside ``reference_kernel`` the output is torchvision's, bit for bit."""
    generator = torch.Generator().manual_seed(2)
    feat = torch.randn(1, 3, 20, 20, generator=generator, requires_grad=True)
    rois = random_rois(10, (80, 80), 1, generator, torch.float32)
    expected = F.adaptive_avg_pool2d(torchvision_roi_align(feat, rois, 14, 0.25, 0, True), 7)
    assert separable_applies(feat, rois)
    assert type(roi_align(feat, rois, 14, 0.25, 7).grad_fn).__name__ == "SeparableRoIAlignBackward"

    trainable_rois = rois.clone().requires_grad_()
    assert not separable_applies(feat, trainable_rois)
    assert torch.equal(roi_align(feat, trainable_rois, 14, 0.25, 7), expected)
    traced = torch.jit.trace(lambda f: roi_align(f, rois, 14, 0.25, 7), (feat,))
    assert "torchvision::roi_align" in str(traced.graph)
    with reference_kernel():
        assert not separable_applies(feat, rois)
        got = roi_align(feat, rois, 14, 0.25, 7)
        assert torch.equal(got, expected)
    got.sum().backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0


def test_pooled_size_must_divide():
    with pytest.raises(ValueError, match="must divide"):
        roi_align(torch.zeros(1, 1, 4, 4), torch.zeros(1, 5), 14, 1.0, 5)
