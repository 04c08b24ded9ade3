"""RPN anchor targets and losses against mmdetection 3.3's own, on RPN outputs of float64 parity fixtures.

Each file in tests/data/mmdet_rpn/ holds the RPN head's raw outputs of one fixture (landscape at two scales,
portrait, ground truth touching the top-left edge, or the bottom-right one with 31 px of padding beside it
(the most one image gets), many instances, and IoU ties between anchors), and what mmdet's ``RPNHead.loss_by_feat`` / ``get_targets`` computed from them, once in float64
(as the fixtures' loss pass) and once in float32 (as mmdet trains). ``tests/tools/mmdet_rpn_reference.py``
wrote them with the peer's python. Every anchor is sampled (num 1e7), so nothing depends on random draws.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from oilleak.models.mmdet_config import spec_from_mmdet
from oilleak.models.presets import build_rpn_head
from oilleak.structures import ImageMeta, Targets

DATA = Path(__file__).parent / "data" / "mmdet_rpn"
CASES = sorted(p.name for p in DATA.glob("*.pt"))
# mmdet's objectness loss is float32 whatever the inputs (its weights are cast to float); the box loss follows
# the dtype, and the stored outputs are float32 values in both runs
REL_TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


def test_the_cases_are_there():
    assert len(CASES) >= 6, CASES


@pytest.fixture(scope="module", params=CASES)
def case(request):
    return torch.load(DATA / request.param, weights_only=True)


def rpn_inputs(case, dtype):
    spec = spec_from_mmdet(case["model_config"])
    head = build_rpn_head(spec.rpn, spec.neck.out_channels)
    meta = case["img_meta"]
    image = ImageMeta(image_id=0, file_name=case["source"]["image_file"], ori_shape=tuple(meta["ori_shape"][:2]),
                      img_shape=tuple(meta["img_shape"][:2]), pad_shape=tuple(meta["pad_shape"][:2]),
                      scale_factor=tuple(meta["scale_factor"][:2]))
    boxes = case["gt_bboxes"].to(dtype)
    targets = Targets(boxes=boxes, labels=torch.zeros(len(boxes), dtype=torch.long),
                      masks=torch.zeros(len(boxes), *image.img_shape, dtype=torch.bool), sem_seg=torch.zeros(image.pad_shape, dtype=torch.uint8))
    cls = [t.to(dtype) for t in case["rpn_cls"]]
    reg = [t.to(dtype) for t in case["rpn_reg"]]
    return head, cls, reg, image, targets


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_positive_anchors_and_sample_count_are_mmdets(case, dtype):
    head, cls, reg, image, targets = rpn_inputs(case, dtype)
    sizes = [tuple(t.shape[-2:]) for t in cls]
    anchors = torch.cat(head.anchor_generator.grid_anchors(sizes, torch.device("cpu")))
    sampled, _objectness, pos, _deltas = head._anchor_targets(anchors, sizes, image, targets)
    ref = case["mmdet"][str(dtype).replace("torch.", "")]
    assert sorted(pos.tolist()) == ref["pos_inds"].tolist()
    assert sampled.numel() == ref["avg_factor"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_rpn_losses_are_mmdets(case, dtype):
    head, cls, reg, image, targets = rpn_inputs(case, dtype)
    losses = head.loss(cls, reg, [image], [targets])
    ref = case["mmdet"][str(dtype).replace("torch.", "")]
    for name in ("loss_rpn_cls", "loss_rpn_bbox"):
        assert float(losses[name]) == pytest.approx(ref[name], rel=REL_TOL[dtype]), name


def test_float32_and_float64_differ_where_the_fixture_has_iou_ties():
    """The case the float64 loss rows failed on (2026-12-07): mmdet's float32 and float64 runs label four
    anchors differently (IoU ties broken by the anchors' float32 areas), and oilleak must follow each."""
    case = torch.load(DATA / "rpn_pos_ties_1130.pt", weights_only=True)
    ref = case["mmdet"]
    assert len(ref["float32"]["pos_inds"]) != len(ref["float64"]["pos_inds"])
