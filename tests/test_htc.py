"""HTC RoI head edge cases and hand-computed checks on a tiny head (8 channels, 3 classes, random weights)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from oilleak.models.bbox_head import Shared2FCBBoxHead
from oilleak.models.box_ops import MaxIoUAssigner, RandomSampler
from oilleak.models.htc import BoxDetections, HybridTaskCascadeRoIHead, boxes_to_rois, roi_levels
from oilleak.models.mask_head import HTCMaskHead, mask_targets, paste_mask_crops, paste_masks
from oilleak.models.specs import InferenceSpec, RoIHeadSpec
from oilleak.models.semantic_head import FusedSemanticHead
from oilleak.structures import ImageMeta, Targets

CHANNELS, CLASSES = 8, 3
PAD_H, PAD_W = 64, 96  # padded input; pyramid strides 4..64


def _tiny_head(mask_merge: str = "mean", samples_per_image: int = 64) -> HybridTaskCascadeRoIHead:
    torch.manual_seed(0)
    thresholds = (0.5, 0.6, 0.7)
    return HybridTaskCascadeRoIHead(
        bbox_heads=[
            Shared2FCBBoxHead(num_classes=CLASSES, in_channels=CHANNELS, fc_channels=16, target_stds=(0.1, 0.1, 0.2, 0.2))
            for _ in thresholds
        ],
        mask_heads=[
            HTCMaskHead(num_classes=CLASSES, in_channels=CHANNELS, conv_out_channels=CHANNELS, with_conv_res=t > 0)
            for t in range(len(thresholds))
        ],
        semantic_head=FusedSemanticHead(num_classes=CLASSES + 1, in_channels=CHANNELS, conv_out_channels=CHANNELS),
        assigners=[MaxIoUAssigner(pos_iou_thr=t, neg_iou_thr=t, min_pos_iou=t) for t in thresholds],
        samplers=[RandomSampler(num=samples_per_image, pos_fraction=0.25, add_gt_as_proposals=True) for _ in thresholds],
        layout=RoIHeadSpec(semantic_num_classes=CLASSES + 1),  # HTC's stages and RoI geometry
        inference=InferenceSpec(mask_merge=mask_merge),
    )


def _feats(seed: int = 1) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(1, CHANNELS, math.ceil(PAD_H / s), math.ceil(PAD_W / s)) for s in (4, 8, 16, 32, 64)]


def _meta(ori_shape: tuple[int, int] = (120, 180)) -> ImageMeta:
    return ImageMeta(
        image_id=0, file_name="x.jpg", ori_shape=ori_shape, img_shape=(60, 90), pad_shape=(PAD_H, PAD_W), scale_factor=(0.5, 0.5)
    )


def _random_boxes(n: int, seed: int = 2) -> torch.Tensor:
    torch.manual_seed(seed)
    xy = torch.rand(n, 2) * torch.tensor([60.0, 40.0])
    wh = 4 + torch.rand(n, 2) * 25
    return torch.cat([xy, xy + wh], dim=1)


def _no_gt_targets() -> Targets:
    return Targets(
        boxes=torch.zeros(0, 4),
        labels=torch.zeros(0, dtype=torch.long),
        masks=torch.zeros(0, 60, 90, dtype=torch.bool),
        sem_seg=torch.zeros(PAD_H, PAD_W, dtype=torch.uint8),
    )


def test_image_without_ground_truth_trains_on_background_only():
    head = _tiny_head().train()
    losses = head.loss(_feats(), [_random_boxes(30)], [_meta()], [_no_gt_targets()])
    for stage in range(3):
        # every RoI is background: no box or mask regression, a positive classification loss
        assert losses[f"s{stage}.loss_bbox"].item() == 0.0
        assert losses[f"s{stage}.loss_mask"].item() == 0.0
        assert losses[f"s{stage}.loss_cls"].item() > 0.0
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.parameters())


def test_no_proposals_and_no_ground_truth_give_zero_losses_with_a_graph():
    # mmdet crashes here (refine_bboxes returns None); oilleak trains on nothing but keeps every key
    head = _tiny_head().train()
    losses = head.loss(_feats(), [torch.zeros(0, 4)], [_meta()], [_no_gt_targets()])
    assert all(v.item() == 0.0 for k, v in losses.items() if k.startswith("s"))
    sum(v for k, v in losses.items() if "loss" in k).backward()


def test_stage_weights_and_keys():
    head = _tiny_head().train()
    boxes = _random_boxes(40)
    targets = Targets(
        boxes=boxes[:2].clone(),
        labels=torch.tensor([0, 2]),
        masks=torch.ones(2, 60, 90, dtype=torch.bool),
        sem_seg=torch.ones(PAD_H, PAD_W, dtype=torch.uint8),
    )
    losses = head.loss(_feats(), [boxes], [_meta()], [targets])
    expected = {"loss_semantic_seg"} | {f"s{t}.{k}" for t in range(3) for k in ("loss_cls", "acc", "loss_bbox", "loss_mask")}
    assert set(losses) == expected
    # the ground truths themselves are positives of every stage, so every stage has a mask loss
    assert all(losses[f"s{t}.loss_mask"].item() > 0 for t in range(3))
    # mask information flow: stage 2's mask loss reaches mask head 0
    losses["s2.loss_mask"].backward()
    assert head.mask_head[0].convs[0].conv.weight.grad.abs().sum() > 0


def _targets_with_two_objects(boxes: torch.Tensor) -> Targets:
    masks = torch.zeros(2, 60, 90, dtype=torch.bool)
    masks[0, 5:30, 10:40] = True
    masks[1, 20:50, 30:80] = True
    return Targets(
        boxes=boxes[:2] + 1.5, labels=torch.tensor([0, 2]), masks=masks, sem_seg=torch.ones(PAD_H, PAD_W, dtype=torch.uint8)
    )


def test_a_batch_of_two_images_equals_the_images_one_by_one():
    # RoIs, samples and refined boxes must stay with their image. Losses are means over the batch's RoIs:
    # with every candidate sampled and equal positive / negative thresholds, image i contributes
    # n_i proposals + its ground truths to every stage.
    head = _tiny_head(samples_per_image=10**7).train()
    feats = [_feats(seed=1), _feats(seed=5)]
    boxes = [_random_boxes(40, seed=2), _random_boxes(25, seed=6)]
    targets = [_targets_with_two_objects(b) for b in boxes]
    singles = [head.loss(f, [b], [_meta()], [t]) for f, b, t in zip(feats, boxes, targets)]
    batch_feats = [torch.cat(levels) for levels in zip(*feats)]
    pair = head.loss(batch_feats, boxes, [_meta(), _meta()], targets)
    rois = [len(b) + len(t.boxes) for b, t in zip(boxes, targets)]
    for name, value in pair.items():
        if "loss_mask" in name:  # averaged over positives, whose numbers the test does not know
            low, high = sorted(s[name].item() for s in singles)
            assert low - 1e-6 <= value.item() <= high + 1e-6, name
            continue
        weights = rois if name.startswith("s") else [1, 1]
        expected = sum(w * s[name].item() for w, s in zip(weights, singles)) / sum(weights)
        assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-7), name

    head.eval()
    both = head.predict(batch_feats, boxes, [_meta(), _meta()])
    for f, b, dets in zip(feats, boxes, both):
        alone = head.predict(f, [b], [_meta()])[0]
        assert len(alone) > 0
        assert torch.allclose(dets.boxes, alone.boxes, atol=1e-4) and torch.equal(dets.labels, alone.labels)
        assert torch.equal(dets.masks, alone.masks)


def test_no_proposals_at_test_time_give_empty_detections():
    head = _tiny_head().eval()
    dets = head.predict(_feats(), [torch.zeros(0, 5)], [_meta((120, 180))])[0]
    assert len(dets) == 0
    assert dets.boxes.shape == (0, 4) and dets.scores.shape == (0,) and dets.labels.shape == (0,)
    assert dets.masks.shape == (0, 120, 180) and dets.masks.dtype == torch.bool


def test_predict_rescales_to_the_original_image():
    head = _tiny_head().eval()
    feats, meta = _feats(), _meta((120, 180))
    scaled = head.predict(feats, [_random_boxes(20)], [meta], rescale=True)[0]
    unscaled = head.predict(feats, [_random_boxes(20)], [meta], rescale=False)[0]
    assert len(scaled) > 0
    assert torch.allclose(scaled.boxes, unscaled.boxes * 2)
    assert scaled.masks.shape[1:] == (120, 180) and unscaled.masks.shape[1:] == (60, 90)
    assert bool((scaled.scores[:-1] >= scaled.scores[1:]).all())


def test_mask_probabilities_merge_the_stages_as_configured():
    head = _tiny_head("mean").eval()
    feats, boxes = _feats(), [_random_boxes(5)]
    with torch.no_grad():
        _, semantic = head.semantic_head(feats)
        stage_logits = head.mask_cascade(feats, semantic, boxes)
        by_hand = (torch.sigmoid(stage_logits[0]) + torch.sigmoid(stage_logits[1]) + torch.sigmoid(stage_logits[2])) / 3
        assert torch.allclose(head.mask_probabilities(feats, semantic, boxes_to_rois(boxes)), by_hand, atol=1e-6)
        head.inference = replace(head.inference, mask_merge="last")
        assert torch.allclose(head.mask_probabilities(feats, semantic, boxes_to_rois(boxes)), torch.sigmoid(stage_logits[2]), atol=1e-6)


def test_finish_pastes_each_detections_own_class():
    head = _tiny_head("mean")
    torch.manual_seed(9)
    probs = torch.rand(2, CLASSES, 28, 28)
    labels = torch.tensor([2, 0])
    used = torch.stack([probs[0, 2], probs[1, 0]])
    # no pixel so close to the threshold that pasting's float rounding could flip it
    assert (used - 0.5).abs().min() > 1e-4
    # boxes of exactly 28x28 pixels at scale 1 paste the 28x28 masks pixel for pixel
    detections = [BoxDetections(boxes=torch.tensor([[0.0, 0.0, 28.0, 28.0], [2.0, 0.0, 30.0, 28.0]]), scores=torch.ones(2), labels=labels)]
    meta = ImageMeta(image_id=0, file_name="x", ori_shape=(28, 30), img_shape=(28, 30), pad_shape=(32, 32), scale_factor=(1.0, 1.0))
    masks = head.finish(detections, probs, [meta])[0].masks
    expected = probs >= 0.5
    assert torch.equal(masks[0, :, :28], expected[0, 2])
    assert torch.equal(masks[1, :, 2:], expected[1, 0])


def test_min_score_keeps_the_same_detections_and_masks_above_it_and_the_best_one():
    head = _tiny_head("last").eval()
    feats, meta = _feats(), _meta((120, 180))
    full = head.predict(feats, [_random_boxes(20)], [meta])[0]
    assert len(full) > 4
    threshold = float(full.scores[len(full) // 2])
    kept = head.predict(feats, [_random_boxes(20)], [meta], min_score=threshold)[0]
    above = full.scores >= threshold
    assert torch.equal(kept.boxes, full.boxes[above]) and torch.equal(kept.labels, full.labels[above])
    assert torch.equal(kept.scores, full.scores[above]) and torch.equal(kept.masks, full.masks[above])
    best_only = head.predict(feats, [_random_boxes(20)], [meta], min_score=1.1)[0]
    assert len(best_only) == 1 and torch.equal(best_only.boxes, full.boxes[:1])


def test_paste_marks_the_pixels_whose_centres_lie_in_the_box():
    probs = torch.ones(1, 28, 28)
    box = torch.tensor([[2.2, 3.7, 8.9, 9.1]])
    pasted = paste_masks(probs, box, (12, 14), 0.5)[0]
    centres_y = torch.arange(12)[:, None] + 0.5
    centres_x = torch.arange(14)[None, :] + 0.5
    inside = (centres_x >= 2.2) & (centres_x <= 8.9) & (centres_y >= 3.7) & (centres_y <= 9.1)
    assert torch.equal(pasted, inside)


def test_paste_of_a_zero_width_box_is_a_short_line_as_in_mmdet_on_cpu():
    # x1 == x2: the normalised x is +-inf, set to 0 (the mask's centre column), and only the box's
    # window (1 px either side) is pasted; rows follow the box's height as for any box
    pasted = paste_masks(torch.ones(1, 28, 28), torch.tensor([[10.0, 5.0, 10.0, 15.0]]), (20, 30), 0.5)[0]
    expected = torch.zeros(20, 30, dtype=torch.bool)
    expected[5:15, 9:11] = True
    assert torch.equal(pasted, expected)


def test_paste_into_windows_keeps_only_the_box_surroundings():
    """Each mask lives in its box's window (1 px margin, clipped to the image); outside it the full mask is
    False, and a box outside the image has an empty window."""
    probs = torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[2.2, 3.7, 8.9, 9.1], [-5.0, 10.0, 6.0, 40.0], [50.0, 50.0, 60.0, 60.0]])
    crops = paste_mask_crops(probs, boxes, (30, 20), 0.5)
    assert [(tuple(c.shape), origin) for c, origin in crops] == [((9, 9), (1, 2)), ((21, 7), (0, 9)), ((0, 0), (0, 0))]
    full = paste_masks(probs, boxes, (30, 20), 0.5)
    for (crop, (x, y)), mask in zip(crops, full, strict=True):
        assert torch.equal(mask[y : y + crop.shape[0], x : x + crop.shape[1]], crop)
        assert int(mask.sum()) == int(crop.sum())  # nothing outside the window


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pasting_in_chunks_gives_the_pixels_of_pasting_one_by_one(dtype):
    # the chunked path (CUDA's default) against the per-mask window path, on random masks and boxes: small,
    # large, fractional, zero-width / -height, partly or wholly outside the image
    generator = torch.Generator().manual_seed(3)
    probs = torch.rand(23, 28, 28, generator=generator)
    xy = torch.rand(23, 2, generator=generator, dtype=torch.float64) * torch.tensor([90.0, 70.0]) - 10
    wh = torch.rand(23, 2, generator=generator, dtype=torch.float64) * torch.tensor([60.0, 40.0])
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[3, 2] = boxes[3, 0]  # zero width
    boxes[4, 3] = boxes[4, 1]  # zero height
    boxes[5] = torch.tensor([100.0, 10.0, 120.0, 30.0], dtype=torch.float64)  # right of the image
    boxes = boxes.to(dtype)
    one_by_one = paste_masks(probs, boxes, (60, 80), 0.5)
    assert one_by_one.any() and not one_by_one[5].any()
    for chunk in (1, 5, 64):
        assert torch.equal(paste_masks(probs, boxes, (60, 80), 0.5, chunk=chunk), one_by_one), chunk


def test_mask_targets_crop_resize_and_clip():
    gt = torch.zeros(2, 56, 56, dtype=torch.bool)
    gt[0, :, :28] = True  # left half
    gt[1, 14:42, 14:42] = True  # centre square
    boxes = torch.tensor([[0.0, 0.0, 56.0, 56.0], [-20.0, -5.0, 56.0, 70.0], [14.0, 14.0, 42.0, 42.0]])
    targets = mask_targets(boxes, gt, torch.tensor([0, 0, 1]), 28)
    left_half = torch.zeros(28, 28)
    left_half[:, :14] = 1
    assert torch.equal(targets[0], left_half)
    assert torch.equal(targets[1], left_half)  # the box is clipped to the image first
    assert torch.equal(targets[2], torch.ones(28, 28))
    assert mask_targets(torch.zeros(0, 4), gt, torch.zeros(0, dtype=torch.long), 28).shape == (0, 28, 28)


def test_box_loss_by_hand():
    head = Shared2FCBBoxHead(num_classes=3, in_channels=1, roi_size=1, fc_channels=2)
    # one logit of 2 per row, at: the label (right), class 2, the background (right), class 0
    hot = [1, 2, 3, 0]
    logits = torch.zeros(4, 4)
    logits[torch.arange(4), torch.tensor(hot)] = 2.0
    labels = torch.tensor([1, 0, 3, 3])  # two positives, two background (label 3)
    deltas = torch.zeros(4, 4)
    targets = torch.zeros(4, 4)
    targets[0, 0], targets[1, 3] = 0.5, 2.0
    targets[2, 0] = 9.0  # a background row: never regressed
    losses = head.loss(logits, deltas, labels, targets)
    log_sum = math.log(math.exp(2) + 3)
    by_hand = sum(log_sum - (2.0 if h == int(y) else 0.0) for h, y in zip(hot, labels)) / 4
    assert losses["loss_cls"].item() == pytest.approx(by_hand, rel=1e-6)
    # SmoothL1 (beta 1): 0.5 * 0.5**2 and 2 - 0.5, divided by all 4 sampled RoIs, not by the 2 positives
    assert losses["loss_bbox"].item() == pytest.approx((0.125 + 1.5) / 4, rel=1e-6)
    assert losses["acc"].item() == pytest.approx(50.0)


def test_semantic_loss_averages_over_all_pixels_ignored_included():
    head = FusedSemanticHead(num_classes=5, in_channels=4, conv_out_channels=4)
    pred = torch.zeros(1, 5, 4, 4)  # uniform: cross entropy log(5) per labelled pixel
    sem_seg = torch.full((1, 32, 32), 2, dtype=torch.uint8)
    sem_seg[0, 0, 0] = 255  # sampled (pixel (0, 0) at stride 8): ignored, counts as 0
    sem_seg[0, 1:8, :] = 255  # not sampled: no effect
    loss = head.loss(pred, sem_seg)
    assert loss.item() == pytest.approx(0.2 * math.log(5) * 15 / 16, rel=1e-6)


def test_roi_levels_follow_the_finest_scale_rule():
    sides = torch.tensor([10.0, 111.9, 112.0, 223.9, 224.0, 448.0, 2000.0])
    rois = torch.stack([torch.zeros(7), torch.zeros(7), torch.zeros(7), sides, sides], dim=1)
    assert roi_levels(rois, 4, 56.0).tolist() == [0, 0, 1, 1, 2, 3, 3]
