"""RoIAlign dealt to several threads at inference gives torchvision's single call's numbers bit for bit."""

from __future__ import annotations

import torch
from torchvision.ops import roi_align as torchvision_roi_align

from oilleak.models import roi_align as threaded_module
from oilleak.models.roi_align import roi_align
from oilleak.parity import intra_op_threads


def test_threaded_roi_align_equals_one_call_bit_for_bit(monkeypatch):
    calls = []
    monkeypatch.setattr(threaded_module, "torchvision_roi_align", lambda *args: calls.append(len(args[1])) or torchvision_roi_align(*args))
    torch.manual_seed(0)
    feat = torch.randn(2, 16, 40, 60)
    corner = torch.rand(101, 2) * torch.tensor([400.0, 250.0])
    rois = torch.cat([torch.randint(0, 2, (101, 1)).float(), corner, corner + torch.rand(101, 2) * 300], dim=1)
    expected = torchvision_roi_align(feat, rois, 7, 1 / 8, 0, True)
    with intra_op_threads(3), torch.inference_mode():
        threaded = roi_align(feat, rois, 7, 1 / 8)
    assert torch.equal(threaded, expected)
    assert sorted(calls) == [33, 34, 34]  # three threads, the RoIs dealt round-robin


def test_with_autograd_it_is_one_differentiable_call():
    feat = torch.randn(1, 4, 20, 20, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 1.0, 60.0, 60.0]] * 40)
    with intra_op_threads(2):
        out = roi_align(feat, rois, 7, 1 / 4)
    out.sum().backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
