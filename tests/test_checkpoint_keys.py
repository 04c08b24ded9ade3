"""Full-size models against mmdet's complete state-dict key lists (../shared/fixtures/mmdet/keys/*.tsv).

Every key of a published checkpoint must land in our model with its exact shape, so mmdet checkpoints load
without renaming. Key/shape checks build the models on the meta device (no memory, no init); loading and the
forward pass use one real 6-class DetectoRS-HTC.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from oilleak.config import ModelConfig
from oilleak.models.checkpoint import load_weights
from oilleak.models.presets import build_from_spec, build_model, detectors_htc_r50, htc_r50
from oilleak.models.specs import ModelSpec
from oilleak.structures import ImageMeta

COCO_CLASSES, COCO_STUFF_CLASSES = 80, 183
DTYPES = {"float32": torch.float32, "int64": torch.int64}
CLASS_DEPENDENT = {
    f"roi_head.{name}.{p}"
    for name in [f"bbox_head.{t}.fc_cls" for t in range(3)] + [f"mask_head.{t}.conv_logits" for t in range(3)]
    + ["semantic_head.conv_logits"]
    for p in ("weight", "bias")
}


def read_keys(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return {key: (tuple(int(d) for d in shape.split("x")) if shape else (), DTYPES[dtype]) for key, shape, dtype in rows}


def coco(spec: ModelSpec) -> ModelSpec:
    return replace(spec, roi_head=replace(spec.roi_head, semantic_num_classes=COCO_STUFF_CLASSES))


def meta_state(spec: ModelSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        model = build_from_spec(spec)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def synthesize(keys: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) if d.is_floating_point else torch.zeros(s, dtype=d) for k, (s, d) in keys.items()}


@pytest.mark.parametrize(
    ("tsv", "spec"),
    [
        ("detectors_htc_r50_coco.tsv", coco(detectors_htc_r50(COCO_CLASSES))),
        ("detectors_htc_r50_oilleak6.tsv", detectors_htc_r50(6)),
        ("htc_r50_coco.tsv", coco(htc_r50(COCO_CLASSES))),
    ],
)
def test_htc_models_have_exactly_mmdets_keys_and_shapes(fixtures_dir, tsv, spec):
    assert meta_state(spec) == read_keys(fixtures_dir / "keys" / tsv)


def test_detectors_cascade_rcnn_keys_all_fit_detectors_htc(fixtures_dir):
    cascade = read_keys(fixtures_dir / "keys" / "detectors_cascade_rcnn_r50_coco.tsv")
    ours = meta_state(coco(detectors_htc_r50(COCO_CLASSES)))
    assert {k: ours.get(k) for k in cascade} == cascade
    assert {k.split(".")[1] for k in ours.keys() - cascade.keys()} == {"mask_head", "semantic_head"}


def test_parameter_count_of_six_class_detectors_htc_equals_mmdets():
    with torch.device("meta"):
        model = build_model(ModelConfig(preset="detectors_htc_r50"), 6)
    assert sum(p.numel() for p in model.parameters()) == 134_424_716  # mmdet 3.3, fixtures README


@pytest.fixture(scope="module")
def detectors_htc_6() -> nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="detectors_htc_r50"), 6)


def test_mmdet_checkpoints_load_into_the_six_class_model(fixtures_dir, detectors_htc_6):
    keys = fixtures_dir / "keys"
    same_classes = synthesize(read_keys(keys / "detectors_htc_r50_oilleak6.tsv"))
    report = load_weights(detectors_htc_6, {"meta": {}, "state_dict": same_classes})
    assert (report.skipped, report.missing, report.unexpected) == ([], [], [])
    assert len(report.loaded) == len(same_classes) == 1258
    assert torch.equal(detectors_htc_6.state_dict()["neck.rfp_modules.0.layer3.5.conv2.offset_l.weight"],
                       same_classes["neck.rfp_modules.0.layer3.5.conv2.offset_l.weight"])

    coco_model = synthesize(read_keys(keys / "detectors_htc_r50_coco.tsv"))
    report = load_weights(detectors_htc_6, coco_model)
    assert {key for key, _, _ in report.skipped} == CLASS_DEPENDENT
    assert dict((k, a) for k, a, _ in report.skipped)["roi_head.semantic_head.conv_logits.weight"] == (183, 256, 1, 1)
    assert (report.missing, report.unexpected) == ([], [])
    assert report.unexplained() == {"skipped": [], "missing": [], "unexpected": []}

    cascade = synthesize(read_keys(keys / "detectors_cascade_rcnn_r50_coco.tsv"))
    report = load_weights(detectors_htc_6, cascade)
    assert {key for key, _, _ in report.skipped} == {k for k in CLASS_DEPENDENT if "bbox_head" in k}
    assert report.unexpected == [] and len(report.loaded) == len(cascade) - 6
    assert {k.split(".")[1] for k in report.missing} == {"mask_head", "semantic_head"}
    assert report.unexplained() == {"skipped": [], "missing": [], "unexpected": []}


@torch.inference_mode()
def test_full_size_model_predicts_on_cpu():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="detectors_htc_r50"), 6).eval()
    height, width = 300, 320
    images = torch.zeros(1, 3, 320, 320)
    images[:, :, :height] = torch.randn(1, 3, height, width)
    meta = ImageMeta(0, "random", (600, 640), (height, width), (320, 320), (0.5, 0.5))
    (dets,) = model(images, [meta])
    assert 0 < len(dets) <= 100 and dets.masks.shape == (len(dets), 600, 640) and dets.masks.dtype == torch.bool
    assert torch.isfinite(dets.boxes).all() and (dets.boxes[:, 2:] <= torch.tensor([640, 600])).all()
    assert torch.all(dets.scores[:-1] >= dets.scores[1:]) and dets.labels.max() < 6
