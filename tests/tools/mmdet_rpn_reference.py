"""mmdetection 3.3's own RPN targets and losses on the RPN outputs of float64 parity fixtures: the reference
for tests/test_rpn_targets.py. Run with the peer's python (../shared/peers/mmdet/setup_cpu.sh):

    .peer/bin/python tests/tools/mmdet_rpn_reference.py OUT_DIR FIXTURE.pt [FIXTURE.pt ...]

The fixtures come from the peer's ``make_parity_fixture.py --double`` (commands in BENCHMARKS.md, "RPN
losses against mmdetection"); a whole fixture is ~40 MB, so only what the RPN loss reads is kept here: the
RPN head's raw outputs (stored float32 values), the image meta, the ground-truth boxes and the model config.
mmdet's ``RPNHead.loss_by_feat`` and ``get_targets`` then run twice on them, as mmdet trains: once with
float64 outputs and boxes (torch's default dtype float64, as the fixture made them) and once all float32.
Stored per dtype: both losses (summed over levels, as mmdet's total), the indices of the positive anchors
and the number of sampled anchors (avg_factor). The sampler takes every anchor (``num`` 1e7), as in the
fixtures' loss pass, so the reference does not depend on random draws.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules


def rpn_reference(fixture: dict, dtype: torch.dtype) -> dict:
    torch.set_default_dtype(dtype)  # mmdet computes its base anchors in the default dtype
    try:
        cfg = ConfigDict(fixture["model_config"]["rpn_head"])
        cfg.train_cfg = ConfigDict(fixture["loss_train_cfg"]["rpn"])
        cfg.test_cfg = ConfigDict(fixture["model_config"]["test_cfg"]["rpn"])
        head = MODELS.build(cfg)
        cls = [t.to(dtype) for t in fixture["outputs"]["rpn_cls"]]
        reg = [t.to(dtype) for t in fixture["outputs"]["rpn_reg"]]
        meta = dict(fixture["inputs"]["img_meta"])
        gt = InstanceData(bboxes=fixture["loss_inputs"]["gt_bboxes"].to(dtype), labels=torch.zeros(len(fixture["loss_inputs"]["gt_bboxes"]), dtype=torch.long))
        losses = head.loss_by_feat(cls, reg, [gt], [meta])
        anchors, valid = head.get_anchors([t.shape[-2:] for t in cls], [meta], device="cpu")
        targets = head.get_targets(anchors, valid, [gt], [meta], None)
        bbox_weights = torch.cat([w.reshape(-1, 4) for w in targets[3]])
        return {
            "loss_rpn_cls": float(sum(losses["loss_rpn_cls"])),
            "loss_rpn_bbox": float(sum(losses["loss_rpn_bbox"])),
            "pos_inds": (bbox_weights[:, 0] > 0).nonzero().flatten(),
            "avg_factor": int(targets[4]),
        }
    finally:
        torch.set_default_dtype(torch.float32)


def main(out_dir: str, *fixtures: str) -> None:
    register_all_modules()
    for path in fixtures:
        fixture = torch.load(path, weights_only=False)
        compact = {
            "source": {"fixture": Path(path).name, "image_file": fixture["inputs"]["image_file"], **fixture["made_with"]},
            # the whole model dict (to build the head as the parity tests do), with the all-anchors sampler
            "model_config": {**fixture["model_config"], "train_cfg": fixture["loss_train_cfg"]},
            "img_meta": dict(fixture["inputs"]["img_meta"]),
            "gt_bboxes": fixture["loss_inputs"]["gt_bboxes"].float(),  # float32 values (the polygons' extremes)
            "rpn_cls": [t.float() for t in fixture["outputs"]["rpn_cls"]],
            "rpn_reg": [t.float() for t in fixture["outputs"]["rpn_reg"]],
            "mmdet": {"float64": rpn_reference(fixture, torch.float64), "float32": rpn_reference(fixture, torch.float32)},
        }
        out = Path(out_dir) / Path(path).name
        torch.save(compact, out)
        print(out, {k: {kk: vv for kk, vv in v.items() if kk != "pos_inds"} for k, v in compact["mmdet"].items()})


if __name__ == "__main__":
    main(*sys.argv[1:])
