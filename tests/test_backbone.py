"""Unit tests of ConvAWS2d, SAConv2d, ResNet's training-mode rules, FPN and RFP, against hand-computed cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oilleak.errors import OilleakError
from oilleak.models.fpn import FPN
from oilleak.models.layers import ConvAWS2d
from oilleak.models.resnet import ResNet
from oilleak.models.rfp import RFP
from oilleak.models.sac import SAConv2d


def hand_standardized(weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per output channel: (w - mean) / sqrt(sum((w - mean)^2) / (n - 1) + 1e-5), then gamma, beta; float64."""
    out = torch.empty_like(weight, dtype=torch.float64)
    for o in range(weight.shape[0]):
        w = weight[o].double()
        n = w.numel()
        mean = w.sum() / n
        var = ((w - mean) ** 2).sum() / (n - 1)
        out[o] = gamma[o].double() * (w - mean) / torch.sqrt(var + 1e-5) + beta[o].double()
    return out.float()


def random_sac(channels: int, stride: int) -> SAConv2d:
    torch.manual_seed(0)
    sac = SAConv2d(channels, channels, stride=stride)
    with torch.no_grad():
        sac.weight.normal_()
        sac.weight_gamma.uniform_(0.5, 1.5)
        sac.weight_beta.uniform_(-0.1, 0.1)
    return sac


def test_conv_aws_equals_hand_standardized_conv():
    torch.manual_seed(0)
    conv = ConvAWS2d(4, 6, 3, stride=2, padding=1, bias=True)
    with torch.no_grad():
        conv.weight_gamma.uniform_(0.5, 2.0)
        conv.weight_beta.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 9, 11)
    expected = F.conv2d(x, hand_standardized(conv.weight, conv.weight_gamma, conv.weight_beta), conv.bias, 2, 1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    assert {"weight", "bias", "weight_gamma", "weight_beta"} == set(conv.state_dict())


def test_conv_aws_matched_to_its_weight_is_the_plain_conv():
    torch.manual_seed(1)
    conv = ConvAWS2d(5, 7, 3, padding=1)
    conv.match_gamma_beta_to_weight()
    x = torch.randn(1, 5, 8, 8)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, None, 1, 1), rtol=1e-5, atol=1e-5)


def test_conv_aws_gradient_reaches_the_raw_weight_only():
    conv = ConvAWS2d(3, 4, 3)
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert [n for n, _ in conv.named_parameters()] == ["weight"]  # gamma / beta are buffers


@pytest.mark.parametrize("stride", [1, 2])
def test_sac_with_identity_init_equals_the_standardized_conv(stride):
    sac = random_sac(8, stride)
    x = torch.randn(2, 8, 13, 10)
    weight = hand_standardized(sac.weight, sac.weight_gamma, sac.weight_beta)
    torch.testing.assert_close(sac(x), F.conv2d(x, weight, None, stride, 1), rtol=1e-4, atol=1e-4)


def test_sac_switch_zero_is_the_dilation_3_branch_with_weight_diff():
    sac = random_sac(6, 1)
    with torch.no_grad():
        sac.switch.bias.zero_()  # S = 0: only the large-dilation look
        sac.weight_diff.normal_(std=0.1)
    x = torch.randn(1, 6, 12, 12)
    weight = hand_standardized(sac.weight, sac.weight_gamma, sac.weight_beta) + sac.weight_diff
    torch.testing.assert_close(sac(x), F.conv2d(x, weight, None, 1, 3, 3), rtol=1e-4, atol=1e-4)


def test_sac_offsets_are_dy_then_dx_per_tap():
    """Offset (dy=1, dx=0) on every tap of the small branch samples one row lower: taps read rows r..r+2."""
    sac = random_sac(4, 1)
    with torch.no_grad():
        sac.offset_s.bias.copy_(torch.tensor([1.0, 0.0] * 9))
    x = torch.randn(1, 4, 9, 7)
    weight = hand_standardized(sac.weight, sac.weight_gamma, sac.weight_beta)
    expected = F.conv2d(F.pad(x, (1, 1, 0, 2)), weight)  # no padding above, two zero rows below
    torch.testing.assert_close(sac(x), expected, rtol=1e-4, atol=1e-4)


def test_sac_contexts_add_global_means_before_and_after():
    sac = random_sac(4, 1)
    with torch.no_grad():
        sac.pre_context.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))  # weight 0: adds the bias
        sac.post_context.weight.copy_(torch.eye(4).view(4, 4, 1, 1))  # adds the output's own mean
    x = torch.randn(1, 4, 8, 8)
    weight = hand_standardized(sac.weight, sac.weight_gamma, sac.weight_beta)
    out = F.conv2d(x + sac.pre_context.bias.view(1, 4, 1, 1), weight, None, 1, 1)
    expected = out + out.mean(dim=(2, 3), keepdim=True) + sac.post_context.bias.view(1, 4, 1, 1)
    torch.testing.assert_close(sac(x), expected, rtol=1e-4, atol=1e-4)


def test_sac_rejects_maps_too_small_for_reflection_padding():
    sac = SAConv2d(4, 4)
    assert sac(torch.randn(1, 4, 3, 3)).shape == (1, 4, 3, 3)
    with pytest.raises(OilleakError, match="at least 3x3"):
        sac(torch.randn(1, 4, 2, 5))


def test_sac_reports_nan_instead_of_crashing_in_deform_conv():
    x = torch.randn(1, 4, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        SAConv2d(4, 4)(x)


def tiny_detectors_resnet(**kwargs) -> ResNet:
    return ResNet(base_channels=4, use_aws=True, stage_with_sac=(False, True, True, True), **kwargs)


@torch.no_grad()
def calibrate_batchnorms(net: nn.Module, x: torch.Tensor, **kwargs) -> None:
    """Set every BN's running statistics to those of ``x``'s activations (untrained ones let them explode)."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics
        bn.train()
    net(x, **kwargs)
    for bn in bns:
        bn.eval()


def test_resnet_shapes_and_state_dict_names():
    net = tiny_detectors_resnet()
    feats = net(torch.randn(1, 3, 96, 128))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 24, 32), (1, 32, 12, 16), (1, 64, 6, 8), (1, 128, 3, 4)]
    assert net.out_channels == [16, 32, 64, 128] and net.strides == [4, 8, 16, 32]
    keys = net.state_dict().keys()
    assert "layer1.0.conv2.weight_gamma" in keys and "layer1.0.conv2.switch.weight" not in keys
    assert "layer2.3.conv2.offset_l.weight" in keys and "layer4.0.downsample.0.weight_beta" in keys
    assert not any("rfp_conv" in k for k in keys)
    assert len([k for k in keys if k.startswith("layer3.")]) == 43 + 5 * 35  # spec §9.1
    assert len(ResNet(depth=101, base_channels=4, use_aws=False).layer3) == 23


def test_resnet_train_keeps_frozen_stages_and_all_bn_in_eval():
    net = tiny_detectors_resnet().train()
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not net.layer1.training and net.layer2.training
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in net.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))}
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net(torch.randn(1, 3, 96, 96))
    assert all(torch.equal(before[k], net.state_dict()[k]) for k in before)  # running stats frozen


def test_resnet_gradients_reach_exactly_the_trainable_parameters():
    torch.manual_seed(0)
    net = tiny_detectors_resnet().train()
    with torch.no_grad():  # leave the identity init so every SAC part is on the gradient path
        for m in net.modules():
            if isinstance(m, SAConv2d):
                for conv in (m.switch, m.pre_context, m.post_context, m.offset_s, m.offset_l):
                    conv.weight.normal_(std=0.01)
                m.weight_diff.normal_(std=0.01)
    x = torch.randn(1, 3, 96, 96)
    calibrate_batchnorms(net, x)
    sum(f.square().mean() for f in net(x)).backward()
    with_grad = {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert "layer2.0.bn1.weight" in trainable and "layer4.2.conv2.offset_s.weight" in trainable


def test_resnet_frozen_stages_options():
    assert all(p.requires_grad for p in ResNet(base_channels=4, use_aws=False, frozen_stages=-1).parameters())
    stem_only = ResNet(base_channels=4, use_aws=False, frozen_stages=0)
    assert not stem_only.conv1.weight.requires_grad and stem_only.layer1[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="depth 34"):
        ResNet(depth=34, use_aws=False)


def test_rfp_feedback_joins_the_first_block_of_stages_2_to_4():
    torch.manual_seed(0)
    net = tiny_detectors_resnet(rfp_inplanes=8).eval()
    rfp_convs = [n for n, m in net.named_modules() if n.endswith("rfp_conv") and m is not None]
    assert rfp_convs == ["layer2.0.rfp_conv", "layer3.0.rfp_conv", "layer4.0.rfp_conv"]
    x = torch.randn(1, 3, 96, 96)
    feedback = [torch.randn(1, 8, 96 // s, 96 // s) for s in (8, 16, 32)]
    with torch.no_grad():
        plain = net(x)
        for name in rfp_convs:
            net.get_submodule(name).weight.zero_()
            net.get_submodule(name).bias.zero_()
        torch.testing.assert_close(net(x, rfp_feats=feedback), plain)
        # a bias of b on layer4.0's rfp_conv adds b inside the block, before its final ReLU
        net.layer4[0].rfp_conv.bias.fill_(0.7)
        block_in = net.layer3(net.layer2(net.layer1(net.stem(x))))
        block = net.layer4[0]
        pre_relu = block.bn3(block.conv3(F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(block_in))))))))
        expected = F.relu(pre_relu + block.downsample(block_in) + 0.7)
        torch.testing.assert_close(block(block_in, feedback[2]), expected)
    with pytest.raises(ValueError, match="rfp_inplanes"):
        tiny_detectors_resnet()(x, rfp_feats=feedback)


def test_fpn_top_down_and_p6():
    fpn = FPN(in_channels=[2, 3], out_channels=2, num_outs=3)
    with torch.no_grad():  # identity-like laterals and output convs make the sum visible
        for block in [*fpn.lateral_convs, *fpn.fpn_convs]:
            block.conv.weight.zero_()
            block.conv.bias.zero_()
            k = block.conv.weight.shape[-1] // 2
            for c in range(2):
                block.conv.weight[c, c, k, k] = 1.0
    c2, c3 = torch.randn(1, 2, 7, 9), torch.randn(1, 3, 4, 5)
    p2, p3, p4 = fpn([c2, c3])
    torch.testing.assert_close(p3, c3[:, :2])
    # nearest upsampling from 4x5 to 7x9 picks source row floor(r * 4 / 7) and column floor(c * 5 / 9)
    rows, cols = torch.tensor([0, 0, 1, 1, 2, 2, 3]), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4])
    torch.testing.assert_close(p2, c2 + c3[:, :2][:, :, rows][:, :, :, cols])
    torch.testing.assert_close(p4, p3[:, :, ::2, ::2])


def test_rfp_steps_use_separate_backbones_and_the_gate():
    torch.manual_seed(0)
    make_backbone = lambda: tiny_detectors_resnet(rfp_inplanes=16)  # noqa: E731
    neck = RFP(
        in_channels=[16, 32, 64, 128], out_channels=16, rfp_backbone=make_backbone(), aspp_out_channels=4, rfp_steps=3
    ).eval()
    assert len(neck.rfp_modules) == 2
    assert neck.rfp_modules[0].conv1.weight.data_ptr() != neck.rfp_modules[1].conv1.weight.data_ptr()
    image = torch.randn(1, 3, 96, 96)
    backbone = tiny_detectors_resnet().eval()
    calibrate_batchnorms(backbone, image)
    with torch.no_grad():
        feats = backbone(image)
        for rfp_backbone in neck.rfp_modules:
            calibrate_batchnorms(rfp_backbone, image, rfp_feats=neck.feedback(neck.pyramid(feats)))
        out = neck(feats, image=image)
        assert [tuple(p.shape[-2:]) for p in out] == [(24, 24), (12, 12), (6, 6), (3, 3), (2, 2)]
        # gate 0.5 everywhere at init: each step averages the new pyramid with the old one
        p = neck.pyramid(feats)
        for backbone in neck.rfp_modules:
            new = neck.pyramid(backbone(image, rfp_feats=neck.feedback(p)))
            p = [(a + b) / 2 for a, b in zip(new, p)]
        for a, b in zip(out, p):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="image"):
        neck(feats)


def test_convaws_plain_load_state_dict_of_a_plain_conv_computes_that_conv():
    # ImageNet weights have no weight_gamma / weight_beta: a plain, strict load_state_dict derives them from
    # the loaded weight, so the standardised conv computes exactly what the plain conv computed
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    plain.weight.data.mul_(3.0).add_(0.5)  # not already standardised
    conv = ConvAWS2d(3, 5, 3, padding=1)
    conv.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-4, atol=1e-5)
    # a state dict that carries the buffers keeps them (an oilleak or mmdet checkpoint)
    again = ConvAWS2d(3, 5, 3, padding=1)
    again.load_state_dict(ConvAWS2d(3, 5, 3, padding=1).state_dict() | {"weight": plain.weight.detach()})
    assert torch.equal(again.weight_gamma, torch.ones(5, 1, 1, 1)) and torch.equal(again.weight_beta, torch.zeros(5, 1, 1, 1))


def test_sac_runs_its_deformable_convolutions_in_the_inputs_dtype():
    """float64 stays float64 end to end (the float64 parity fixtures need it: a float32 detour cost 6e-6 at C3);
    under autocast the half / bfloat16 input is lifted to float32, which torchvision's kernels need."""
    sac = random_sac(8, stride=1).eval()
    x = torch.randn(1, 8, 12, 14)
    with torch.no_grad():
        reference = sac(x)
        in_float64 = sac.double()(x.double())
    assert in_float64.dtype == torch.float64
    torch.testing.assert_close(in_float64.float(), reference, rtol=1e-5, atol=1e-5)
    sac.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = sac(x.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
