"""BatchNorm folded into the backbone convolutions (the predict path) still reproduces mmdet 3.3.

Same comparisons as tests/test_backbone_parity.py, with the model folded after loading the fixture's weights:
stage by stage on the float32 fixtures (1e-4 relative), end to end from the image on the float64 ones (1e-6).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from oilleak.models.fold_batchnorm import fold_frozen_batchnorm
from oilleak.models.mmdet_config import model_from_mmdet_config
from oilleak.models.sac import SAConv2d
from oilleak.parity import intra_op_threads
from tests.conftest import F64_FIXTURE_NAMES, FIXTURE_NAMES
from tests.test_backbone_parity import assert_close_all


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def folded_model(fixture: dict, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = model_from_mmdet_config(fixture["model_config"])
    model.load_state_dict(fixture["state_dict"], strict=True)
    # folded in the compute dtype: float32-rounded folded weights would put 1e-7 into float64's comparison,
    # which the random-weight SAC stages amplify to 2e-3 at C5
    return fold_frozen_batchnorm(model.to(dtype).eval())


@pytest.mark.parametrize("name", FIXTURE_NAMES)
@torch.inference_mode()
def test_folded_backbone_stages_match_mmdet(fixtures_dir, name):
    fixture = torch.load(fixtures_dir / name, weights_only=True)
    model = folded_model(fixture)
    # only SAC's norms stay (a context branch sits between SAC and its norm)
    assert count(model, nn.BatchNorm2d) == count(model, SAConv2d)
    backbone = model.backbone
    ref_feats = fixture["outputs"]["backbone"]
    stage_inputs = [backbone.stem(fixture["inputs"]["batch_inputs"]), *ref_feats[:-1]]
    ours = [stage(x) for stage, x in zip(backbone.stages(), stage_inputs, strict=True)]
    assert_close_all(ours, ref_feats, ["C2", "C3", "C4", "C5"])


@pytest.mark.parametrize("name", F64_FIXTURE_NAMES)
@torch.inference_mode()
def test_folded_image_to_pyramid_matches_mmdet_in_float64(fixtures_dir, name):
    fixture = torch.load(fixtures_dir / name, weights_only=True)
    model = folded_model(fixture, torch.float64)
    images = fixture["inputs"]["batch_inputs"].double()
    with intra_op_threads(1):
        feats = model.backbone(images)
        pyramid = model.neck(feats, image=images)
    outputs = fixture["outputs"]
    assert_close_all(feats, [f.double() for f in outputs["backbone"]], ["C2", "C3", "C4", "C5"], tol=1e-6)
    assert_close_all(pyramid, [p.double() for p in outputs["neck"]], ["P2", "P3", "P4", "P5", "P6"], tol=1e-6)


def test_folding_a_training_model_is_refused():
    with pytest.raises(ValueError, match="eval"):
        fold_frozen_batchnorm(nn.Sequential().train())
