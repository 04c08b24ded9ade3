"""The HTC RoI head against mmdet 3.3.0 (the parity fixtures), independent of the backbone: the fixture's
neck outputs are the features, its RPN test proposals the proposals, its ``roi_head.*`` weights loaded
strictly, the head built from its ``model_config`` (by ``mmdet_config.model_from_mmdet_config``, the project's
one reader of mmdet configs). Loss mode needs the RPN's TRAINING proposals, which the fixture does not
store: the RPN head (``rpn_head.*`` weights) makes them from the same features."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from oilleak.models.detector import HybridTaskCascade
from oilleak.models.htc import HybridTaskCascadeRoIHead
from oilleak.models.mmdet_config import model_from_mmdet_config
from oilleak.parity import fixture_meta, fixture_targets, match_detections
from tests.conftest import FIXTURE_NAMES

REL_TOL = 1e-4


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture(request, fixtures_dir):
    return torch.load(fixtures_dir / request.param, weights_only=True)


def _weights(fx: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in fx["state_dict"].items() if k.startswith(prefix)}


def _model(fx: dict, train_cfg: dict | None = None) -> HybridTaskCascade:
    """The fixture's model; ``train_cfg`` replaces its training settings (the loss fixture's samplers)."""
    cfg = fx["model_config"] if train_cfg is None else {**fx["model_config"], "train_cfg": train_cfg}
    return model_from_mmdet_config(cfg, mask_merge="last")  # "last": what mmdet 3.3 does


def _head(fx: dict) -> HybridTaskCascadeRoIHead:
    head = _model(fx).roi_head
    head.load_state_dict(_weights(fx, "roi_head."), strict=True)
    return head.eval()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    rel = float((ours - ref).abs().max() / ref.abs().max())
    assert rel <= REL_TOL, f"{what}: max abs diff / max abs value = {rel:.2e}"


def _match(ours: dict, ref: dict) -> list[tuple[int, int]]:
    """One-to-one pairs (ours, ref) by ``oilleak parity``'s rule: same label, box IoU >= 0.999, |score diff| <= 1e-4."""
    return match_detections(ours["boxes"], ours["scores"], ours["labels"], ref["bboxes"], ref["scores"], ref["labels"])


def _assert_matched(pairs: list, n_ours: int, n_ref: int, what: str) -> None:
    assert n_ref > 0, f"{what}: the fixture has no detections to compare with"
    assert len(pairs) >= 0.99 * n_ref and len(pairs) >= 0.99 * n_ours, (
        f"{what}: {len(pairs)} matched of {n_ours} ours / {n_ref} mmdet"
    )


def test_semantic_head_matches_mmdet(fixture):
    out = fixture["outputs"]
    with torch.no_grad():
        pred, feat = _head(fixture).semantic_head(out["neck"])
    _assert_close(pred, out["semantic_pred"], "semantic_pred")
    _assert_close(feat, out["semantic_feat"], "semantic_feat")


def test_box_cascade_matches_mmdet(fixture):
    out, head = fixture["outputs"], _head(fixture)
    with torch.no_grad():
        _, semantic_feat = head.semantic_head(out["neck"])
        cascade = head.box_cascade(out["neck"], semantic_feat, [out["proposals"][:, :4]], [fixture_meta(fixture)])
    for stage in range(head.num_stages):
        _assert_close(cascade.cls[stage], out["stage_cls"][stage], f"stage {stage} cls")
        _assert_close(cascade.reg[stage], out["stage_reg"][stage], f"stage {stage} reg")


def test_mask_cascade_matches_mmdet_on_its_detections(fixture):
    out, head = fixture["outputs"], _head(fixture)
    with torch.no_grad():
        _, semantic_feat = head.semantic_head(out["neck"])
        logits = head.mask_cascade(out["neck"], semantic_feat, [out["dets_input_scale"]["bboxes"]])
    for stage in range(head.num_stages):
        _assert_close(logits[stage], out["mask_logits"][stage], f"stage {stage} mask logits")


def test_detections_and_masks_match_mmdet(fixture):
    out, head, meta = fixture["outputs"], _head(fixture), fixture_meta(fixture)
    with torch.no_grad():
        _, semantic_feat = head.semantic_head(out["neck"])
        cascade = head.box_cascade(out["neck"], semantic_feat, [out["proposals"][:, :4]], [meta])
        before_masks = head.detect(cascade, [meta])[0]
        dets = head.predict(out["neck"], [out["proposals"]], [meta], rescale=True)[0]

    ref = out["dets_input_scale"]
    ours = {"boxes": before_masks.boxes, "scores": before_masks.scores, "labels": before_masks.labels}
    _assert_matched(_match(ours, ref), len(before_masks.scores), len(ref["scores"]), "dets_input_scale")

    ref = out["dets"]
    pairs = _match({"boxes": dets.boxes, "scores": dets.scores, "labels": dets.labels}, ref)
    _assert_matched(pairs, len(dets), len(ref["scores"]), "dets")
    assert dets.masks.dtype == torch.bool and dets.masks.shape == (len(dets), *meta.ori_shape)
    ref_rles = [{"size": r["size"], "counts": r["counts"].encode()} for r in ref["masks_rle"]]
    our_rles = mask_utils.encode(np.asfortranarray(dets.masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    for o, r in pairs:
        if mask_utils.area(our_rles[o]) == 0 and mask_utils.area(ref_rles[r]) == 0:
            continue
        iou = mask_utils.iou([our_rles[o]], [ref_rles[r]], [0])[0, 0]
        assert iou >= 0.99, f"mask of detection {r}: IoU {iou:.4f} with mmdet's"


def test_losses_match_mmdet(fixture):
    feats, meta = fixture["outputs"]["neck"], fixture_meta(fixture)
    # the fixture's samplers take every candidate (num 1e7), so its losses are deterministic
    model = _model(fixture, train_cfg=fixture["loss_train_cfg"])
    model.rpn_head.load_state_dict(_weights(fixture, "rpn_head."), strict=True)
    model.roi_head.load_state_dict(_weights(fixture, "roi_head."), strict=True)
    with torch.no_grad():
        proposals = model.rpn_head.proposals(*model.rpn_head(feats), [meta], training=True)
    losses = model.roi_head.train().loss(feats, [p[:, :4] for p in proposals], [meta], [fixture_targets(fixture)])

    expected = {k: v for k, v in fixture["losses"].items() if not k.startswith("loss_rpn")}
    assert set(losses) == set(expected)
    for name, ref in expected.items():
        value = float(losses[name].detach())
        assert abs(value - ref) <= REL_TOL * abs(ref), f"{name}: ours {value:.7g}, mmdet {ref:.7g}"
