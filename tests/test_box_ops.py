"""Box coder, IoU, assigner, sampler and NMS against hand-computed cases and brute-force references."""

from __future__ import annotations

import math

import pytest
import torch

from oilleak.models.box_ops import (
    IGNORED,
    MAX_LOG_SCALE,
    NEGATIVE,
    NMS_SPLIT_THRESHOLD,
    AssignResult,
    DeltaXYWHBoxCoder,
    MaxIoUAssigner,
    RandomSampler,
    batched_nms,
    box_iou,
)


def random_boxes(n: int, size: float = 100.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 4 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ---------------------------------------------------------------------------------------------- coder


def test_encode_hand_computed():
    # proposal centre (5, 5) size 10x10; gt centre (15, 10) size 20x10
    coder = DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    deltas = coder.encode(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 5.0, 25.0, 15.0]]))
    expected = torch.tensor([[1.0 / 0.1, 0.5 / 0.1, math.log(2.0) / 0.2, 0.0]])
    torch.testing.assert_close(deltas, expected)


@pytest.mark.parametrize("stds", [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2), (0.033, 0.033, 0.067, 0.067)])
def test_decode_inverts_encode(stds):
    coder = DeltaXYWHBoxCoder(means=(0.0, 0.1, -0.2, 0.05), stds=stds)
    proposals, gt = random_boxes(200, seed=1), random_boxes(200, seed=2)
    torch.testing.assert_close(coder.decode(proposals, coder.encode(proposals, gt)), gt, atol=1e-4, rtol=1e-5)


def test_decode_clamps_log_scale_and_image():
    coder = DeltaXYWHBoxCoder()
    proposal = torch.tensor([[10.0, 10.0, 12.0, 14.0]])  # centre (11, 12), size 2x4
    huge = coder.decode(proposal, torch.tensor([[0.0, 0.0, 50.0, -50.0]]))
    w, h = 2 * math.exp(MAX_LOG_SCALE), 4 * math.exp(-MAX_LOG_SCALE)
    torch.testing.assert_close(huge, torch.tensor([[11 - w / 2, 12 - h / 2, 11 + w / 2, 12 + h / 2]]))
    assert MAX_LOG_SCALE == pytest.approx(math.log(1000 / 16))
    clipped = coder.decode(proposal, torch.tensor([[0.0, 0.0, 50.0, 50.0]]), max_shape=(30, 20))
    torch.testing.assert_close(clipped, torch.tensor([[0.0, 0.0, 20.0, 30.0]]))


def test_decode_empty():
    assert DeltaXYWHBoxCoder().decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


# ---------------------------------------------------------------------------------------------- IoU


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 0.0, 0.0]])
    iou = box_iou(a, b)
    expected = torch.tensor([[25.0 / 175.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(iou, expected)
    assert not torch.isnan(iou).any()


# ---------------------------------------------------------------------------------------------- assigner


def test_assigner_thresholds_and_labels():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # IoU 1       -> positive
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5      -> between 0.3 and 0.7: ignored
            [0.0, 0.0, 10.0, 2.0],  # IoU 0.2      -> negative
            [50.0, 50.0, 60.0, 60.0],  # IoU 0     -> negative
        ]
    )
    result = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3).assign(boxes, gt, torch.tensor([4]))
    assert result.gt_inds.tolist() == [1, IGNORED, NEGATIVE, NEGATIVE]
    assert result.labels.tolist() == [4, -1, -1, -1]
    torch.testing.assert_close(result.max_overlaps, torch.tensor([1.0, 0.5, 0.2, 0.0]))


def test_assigner_low_quality_assigns_all_tied_maxima():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 4.0],  # IoU 0.4 with gt 0 (its best, tied)
            [0.0, 6.0, 10.0, 10.0],  # IoU 0.4 with gt 0 (tied)
            [0.0, 0.0, 10.0, 3.0],  # IoU 0.3 with gt 0: ignored, not the max
            [100.0, 100.0, 110.0, 102.0],  # IoU 0.2 with gt 1: below min_pos_iou -> stays negative
        ]
    )
    labels = torch.tensor([2, 5])
    assign_all = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3).assign(boxes, gt, labels)
    assert assign_all.gt_inds.tolist() == [1, 1, IGNORED, NEGATIVE]
    assert assign_all.labels.tolist() == [2, 2, -1, -1]
    first_only = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, gt_max_assign_all=False)
    assert first_only.assign(boxes, gt, labels).gt_inds.tolist() == [1, IGNORED, IGNORED, NEGATIVE]
    no_low_quality = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3, match_low_quality=False)
    assert no_low_quality.assign(boxes, gt, labels).gt_inds.tolist() == [IGNORED, IGNORED, IGNORED, NEGATIVE]


def test_assigner_low_quality_later_gt_wins_and_can_move_positives():
    # box 0 overlaps gt 0 with IoU 0.9 (positive to gt 0 by threshold) and gt 1 with IoU 70/110; it is the
    # best match of both ground truths, and low-quality matching (run after the thresholds, gts in order)
    # moves it to the later one, gt 1, as mmdet does.
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 2.0, 10.0, 11.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0]])
    result = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5).assign(boxes, gt, torch.tensor([0, 1]))
    torch.testing.assert_close(box_iou(gt, boxes)[:, 0], torch.tensor([0.9, 70.0 / 110.0]))
    assert result.gt_inds.tolist() == [2, NEGATIVE]
    assert result.labels.tolist() == [1, -1]
    torch.testing.assert_close(result.max_overlaps, torch.tensor([0.9, 0.0]))


def test_assigner_without_gt_makes_everything_negative():
    result = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3).assign(
        random_boxes(5), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    )
    assert result.gt_inds.tolist() == [NEGATIVE] * 5
    assert result.labels.tolist() == [-1] * 5
    no_boxes = MaxIoUAssigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3).assign(
        torch.zeros(0, 4), random_boxes(2), torch.tensor([0, 1])
    )
    assert no_boxes.gt_inds.numel() == 0


# ---------------------------------------------------------------------------------------------- sampler


def _assignment(num_pos: int, num_neg: int, num_ignored: int, num_gts: int = 2):
    """An assignment over a shuffled candidate list with known positive / negative / ignored counts."""
    gt_inds = torch.tensor([1 + i % num_gts for i in range(num_pos)] + [NEGATIVE] * num_neg + [IGNORED] * num_ignored)
    gt_inds = gt_inds[torch.randperm(len(gt_inds), generator=torch.Generator().manual_seed(3))]
    labels = torch.where(gt_inds > 0, gt_inds + 10, torch.full_like(gt_inds, -1))
    return AssignResult(num_gts, gt_inds, torch.zeros(len(gt_inds)), labels)


def test_sampler_counts_and_order():
    assign = _assignment(num_pos=40, num_neg=300, num_ignored=20)
    boxes = random_boxes(len(assign.gt_inds))
    gt_boxes = random_boxes(2, seed=9)
    sampler = RandomSampler(num=64, pos_fraction=0.25, add_gt_as_proposals=False, generator=torch.Generator().manual_seed(0))
    result = sampler.sample(assign, boxes, gt_boxes, torch.tensor([11, 12]))
    assert result.num_pos == 16 and result.num_neg == 48 and result.num_sampled == 64
    assert (assign.gt_inds[result.pos_inds] > 0).all() and (assign.gt_inds[result.neg_inds] == NEGATIVE).all()
    assert torch.equal(result.pos_inds, result.pos_inds.sort()[0]) and len(result.pos_inds.unique()) == 16
    torch.testing.assert_close(result.pos_gt_boxes, gt_boxes[assign.gt_inds[result.pos_inds] - 1])
    assert torch.equal(result.pos_gt_labels, assign.gt_inds[result.pos_inds] + 10)
    assert not result.pos_is_gt.any()


def test_sampler_fills_with_negatives_when_positives_are_few():
    assign = _assignment(num_pos=3, num_neg=300, num_ignored=5)
    result = RandomSampler(num=64, pos_fraction=0.25, add_gt_as_proposals=False).sample(
        assign, random_boxes(308), random_boxes(2, seed=9), torch.tensor([11, 12])
    )
    assert result.num_pos == 3 and result.num_neg == 61


def test_sampler_takes_everything_when_num_is_huge():
    assign = _assignment(num_pos=7, num_neg=30, num_ignored=5)
    result = RandomSampler(num=10**7, pos_fraction=0.5, add_gt_as_proposals=False).sample(
        assign, random_boxes(42), random_boxes(2, seed=9), torch.tensor([11, 12])
    )
    assert torch.equal(result.pos_inds, torch.nonzero(assign.gt_inds > 0).flatten())
    assert torch.equal(result.neg_inds, torch.nonzero(assign.gt_inds == NEGATIVE).flatten())


def test_sampler_prepends_gt_first():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 70.0, 60.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 9.0], [80.0, 80.0, 90.0, 90.0], [50.0, 50.0, 70.0, 61.0]])
    gt_labels = torch.tensor([3, 1])
    assign = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5).assign(boxes, gt, gt_labels)
    result = RandomSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True).sample(assign, boxes, gt, gt_labels)
    # candidates: [gt0, gt1, box0, box1, box2]; positives gt0, gt1, box0 (-> gt0), box2 (-> gt1)
    assert result.pos_inds.tolist() == [0, 1, 2, 4]
    assert result.neg_inds.tolist() == [3]
    assert result.pos_is_gt.tolist() == [True, True, False, False]
    assert result.pos_gt_index.tolist() == [0, 1, 0, 1]
    assert result.pos_gt_labels.tolist() == [3, 1, 3, 1]
    torch.testing.assert_close(result.pos_boxes[:2], gt)
    # an image without ground truth adds nothing
    empty = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5).assign(
        boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    )
    none = RandomSampler(num=512, pos_fraction=0.25, add_gt_as_proposals=True).sample(
        empty, boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    )
    assert none.num_pos == 0 and none.neg_inds.tolist() == [0, 1, 2] and none.pos_gt_boxes.shape == (0, 4)


# ---------------------------------------------------------------------------------------------- NMS


def brute_force_batched_nms(boxes, scores, idxs, iou_thr):
    """Greedy NMS per class in plain Python order: highest score first, drop later boxes with IoU > thr."""
    keep = []
    for c in idxs.unique().tolist():
        members = [i for i in range(len(boxes)) if idxs[i] == c]
        members.sort(key=lambda i: -float(scores[i]))
        alive = []
        for i in members:
            if all(float(box_iou(boxes[i : i + 1], boxes[j : j + 1])) <= iou_thr for j in alive):
                alive.append(i)
        keep.extend(alive)
    return sorted(keep, key=lambda i: -float(scores[i]))


@pytest.mark.parametrize("n,classes", [(300, 1), (300, 4), (NMS_SPLIT_THRESHOLD + 200, 60)])
def test_batched_nms_matches_brute_force(n, classes):
    g = torch.Generator().manual_seed(n)
    # clustered boxes so that many pairs overlap near the threshold
    centres = torch.rand(n // 10 + 1, 2, generator=g) * 200
    xy = centres[torch.randint(len(centres), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 4
    wh = 10 + torch.rand(n, 2, generator=g) * 20
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(classes, (n,), generator=g)
    keep = batched_nms(boxes, scores, idxs, 0.5)
    if n >= NMS_SPLIT_THRESHOLD:  # keep the pure-Python reference affordable: check a few classes fully
        chosen = idxs < 3
        ref_idx = torch.nonzero(chosen).flatten()
        ref = ref_idx[brute_force_batched_nms(boxes[chosen], scores[chosen], idxs[chosen], 0.5)].tolist()
        assert [i for i in keep.tolist() if idxs[i] < 3] == ref
        assert len(keep) > 3 * n // classes // 4
    else:
        assert keep.tolist() == brute_force_batched_nms(boxes, scores, idxs, 0.5)
    assert torch.all(scores[keep][:-1] >= scores[keep][1:])


def test_batched_nms_never_suppresses_across_classes():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.5, 0.0, 10.0, 10.0]])
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([0, 1, 0]), 0.5)
    assert keep.tolist() == [0, 1]
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).numel() == 0
