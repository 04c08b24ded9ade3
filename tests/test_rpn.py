"""Anchors, proposals and the RPN loss on hand-computed cases (the mmdet comparison is test_rpn_parity.py)."""

from __future__ import annotations

import math

import pytest
import torch

from oilleak.models.rpn import AnchorGenerator, ProposalSettings, RPNHead, RPNTrainSettings
from oilleak.structures import ImageMeta, Targets

ANCHORS = AnchorGenerator(strides=(4, 8, 16, 32, 64), ratios=(0.5, 1.0, 2.0), scales=(8.0,))


def make_head(**train) -> RPNHead:
    return RPNHead(
        in_channels=8,
        feat_channels=8,
        anchor_generator=ANCHORS,
        train_settings=RPNTrainSettings(**train),
        train_proposals=ProposalSettings(nms_pre=2000, max_per_img=2000),
        test_proposals=ProposalSettings(nms_pre=1000, max_per_img=1000),
    )


def meta(img_shape, pad_shape) -> ImageMeta:
    return ImageMeta(0, "x.jpg", ori_shape=img_shape, img_shape=img_shape, pad_shape=pad_shape, scale_factor=(1.0, 1.0))


def level_sizes(pad_shape):
    return [(math.ceil(pad_shape[0] / s), math.ceil(pad_shape[1] / s)) for s in ANCHORS.strides]


def test_base_anchors_are_corner_centred_in_ratio_order():
    half_long, half_short = 16 * math.sqrt(2), 8 * math.sqrt(2)  # 45.25 x 22.63 for ratio 0.5 (h / w)
    expected = torch.tensor(
        [[-half_long, -half_short, half_long, half_short], [-16.0, -16.0, 16.0, 16.0], [-half_short, -half_long, half_short, half_long]]
    )
    torch.testing.assert_close(ANCHORS.base_anchors(4), expected)
    areas = [float((a[2] - a[0]) * (a[3] - a[1])) for s in ANCHORS.strides for a in ANCHORS.base_anchors(s)]
    assert areas == pytest.approx([a for s in (32, 64, 128, 256, 512) for a in [s * s] * 3], rel=1e-5)


def test_grid_anchors_are_row_major_with_anchor_fastest():
    (level,) = AnchorGenerator(strides=(4,), ratios=(0.5, 1.0, 2.0), scales=(8.0,)).grid_anchors([(2, 3)], torch.device("cpu"))
    assert level.shape == (2 * 3 * 3, 4)
    # location y = 1, x = 2 -> index (1 * 3 + 2) * 3 + anchor; its top-left-corner centre is (8, 4)
    torch.testing.assert_close(level[(1 * 3 + 2) * 3 + 1], torch.tensor([8.0 - 16, 4.0 - 16, 8.0 + 16, 4.0 + 16]))
    # the spec's example: 268,569 anchors for an 800 x 1344 input
    sizes = [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)]
    assert sum(len(a) for a in ANCHORS.grid_anchors(sizes, torch.device("cpu"))) == 268_569


def test_valid_flags_cover_the_image_padding_only():
    (flags,) = AnchorGenerator(strides=(8,), ratios=(1.0,), scales=(8.0,)).valid_flags([(4, 5)], (20, 32), torch.device("cpu"))
    grid = flags.reshape(4, 5)
    # ceil(20 / 8) = 3 rows, ceil(32 / 8) = 4 columns belong to this image; the rest is another image's size
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[:3, :4] = True
    assert torch.equal(grid, expected)


def test_usable_anchors_lie_fully_inside_the_image():
    head = make_head(num_samples=10**7)
    img_shape, pad_shape = (70, 90), (96, 96)
    sizes = level_sizes(pad_shape)
    anchors = torch.cat(ANCHORS.grid_anchors(sizes, torch.device("cpu")))
    no_gt = Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, *img_shape, dtype=torch.bool), torch.zeros(pad_shape, dtype=torch.uint8))
    sampled, objectness, pos, _ = head._anchor_targets(anchors, sizes, meta(img_shape, pad_shape), no_gt)
    # brute force: every anchor of every cell, kept when x1 >= 0, y1 >= 0, x2 < W, y2 < H
    inside = [
        i for i, (x1, y1, x2, y2) in enumerate(anchors.tolist()) if x1 >= 0 and y1 >= 0 and x2 < img_shape[1] and y2 < img_shape[0]
    ]
    assert sorted(sampled.tolist()) == inside and len(inside) > 0
    assert pos.numel() == 0 and not objectness.any()


def test_loss_without_ground_truth_is_background_only():
    head = make_head()
    pad_shape = (64, 96)
    cls = [torch.zeros(1, 3, h, w, requires_grad=True) for h, w in level_sizes(pad_shape)]
    reg = [torch.randn(1, 12, h, w, requires_grad=True) for h, w in level_sizes(pad_shape)]
    no_gt = Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 60, 90, dtype=torch.bool), torch.zeros(pad_shape, dtype=torch.uint8))
    losses = head.loss(cls, reg, [meta((60, 90), pad_shape)], [no_gt])
    # every sampled anchor is a negative with logit 0: BCE = ln 2 each, averaged over the sampled ones
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert losses["loss_rpn_bbox"].item() == 0.0
    (losses["loss_rpn_cls"] + losses["loss_rpn_bbox"]).backward()
    assert cls[0].grad is not None and reg[0].grad is not None


def test_loss_with_an_anchor_shaped_box_has_one_exact_positive():
    # the stride-4 neighbours of the matching anchor overlap it by 28 x 32 px: IoU 896 / 1152 = 0.78, so
    # with a positive threshold of 0.8 they are ignored and the anchor itself is the only positive
    head = make_head(num_samples=10**7, pos_iou_thr=0.8)
    pad_shape = (64, 64)
    sizes = level_sizes(pad_shape)
    anchors = torch.cat(ANCHORS.grid_anchors(sizes, torch.device("cpu")))
    gt_box = torch.tensor([[8.0, 8.0, 40.0, 40.0]])  # the 32 x 32 anchor centred at (24, 24) on the stride-4 level
    target = Targets(gt_box, torch.tensor([3]), torch.zeros(1, 64, 64, dtype=torch.bool), torch.zeros(pad_shape, dtype=torch.uint8))
    sampled, objectness, pos, pos_deltas = head._anchor_targets(anchors, sizes, meta((64, 64), pad_shape), target)
    assert pos.tolist() == [(6 * 16 + 6) * 3 + 1]
    torch.testing.assert_close(anchors[pos], gt_box)
    torch.testing.assert_close(pos_deltas, torch.zeros(1, 4))
    assert int(objectness.sum()) == 1
    # the predicted deltas of that anchor are the regression loss: smooth-L1 with beta 1/9, over all sampled
    reg = [torch.zeros(1, 12, h, w) for h, w in sizes]
    reg[0][0, 4:8, 6, 6] = torch.tensor([0.05, -0.5, 0.0, 1.0])
    cls = [torch.zeros(1, 3, h, w) for h, w in sizes]
    losses = head.loss(cls, reg, [meta((64, 64), pad_shape)], [target])
    beta = 1 / 9
    expected = (0.5 * 0.05**2 / beta + (0.5 - beta / 2) + (1.0 - beta / 2)) / len(sampled)
    assert float(losses["loss_rpn_bbox"]) == pytest.approx(expected, rel=1e-5)


def test_proposals_empty_when_no_box_survives():
    head = make_head()
    pad_shape = (64, 64)
    cls = [torch.randn(1, 3, h, w) for h, w in level_sizes(pad_shape)]
    # every box is pushed far right: clamped to the image it has zero width
    reg = [torch.zeros(1, 12, h, w) for h, w in level_sizes(pad_shape)]
    for r in reg:
        r[:, 0::4] = 1e4
    (proposals,) = head.proposals(cls, reg, [meta((64, 64), pad_shape)], training=False)
    assert proposals.shape == (0, 5)


def test_proposals_are_clamped_sorted_and_capped():
    head = make_head()
    head.test_proposals = ProposalSettings(nms_pre=50, max_per_img=30, nms_iou=0.7)
    pad_shape = (64, 96)
    g = torch.Generator().manual_seed(0)
    cls = [torch.randn(1, 3, h, w, generator=g) for h, w in level_sizes(pad_shape)]
    reg = [torch.randn(1, 12, h, w, generator=g) * 0.3 for h, w in level_sizes(pad_shape)]
    (proposals,) = head.proposals(cls, reg, [meta((60, 90), pad_shape)], training=False)
    assert len(proposals) == 30
    assert torch.all(proposals[:-1, 4] >= proposals[1:, 4])
    assert proposals[:, [0, 2]].min() >= 0 and proposals[:, [0, 2]].max() <= 90
    assert proposals[:, [1, 3]].min() >= 0 and proposals[:, [1, 3]].max() <= 60
    assert ((proposals[:, 2] > proposals[:, 0]) & (proposals[:, 3] > proposals[:, 1])).all()
    # scores are the sigmoid of the best logits: the top proposal carries the best logit of all levels
    best = max(float(c.max()) for c in cls)
    assert float(proposals[0, 4]) == pytest.approx(torch.sigmoid(torch.tensor(best)).item(), rel=1e-6)


def test_head_init_and_shapes():
    head = make_head()
    convs = (head.rpn_conv, head.rpn_cls, head.rpn_reg)
    weights = torch.cat([conv.weight.detach().flatten() for conv in convs])  # ~700 values: std within ~10%
    assert weights.std().item() == pytest.approx(0.01, rel=0.2) and abs(weights.mean().item()) < 0.002
    assert not any(conv.bias.any() for conv in convs)
    cls, reg = head([torch.randn(2, 8, 16, 24), torch.randn(2, 8, 8, 12)])
    assert [tuple(c.shape) for c in cls] == [(2, 3, 16, 24), (2, 3, 8, 12)]
    assert [tuple(r.shape) for r in reg] == [(2, 12, 16, 24), (2, 12, 8, 12)]
