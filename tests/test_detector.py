"""The assembled detector and its presets: mmdet's state-dict layout, mmdet's config values, initialisation,
the train / eval contract, and a loss step that reaches every trainable parameter."""

from __future__ import annotations

import math

import pytest
import torch

from oilleak.config import PRESETS as CONFIG_PRESETS
from oilleak.config import ModelConfig
from oilleak.errors import OilleakError
from oilleak.models.detector import total_loss
from oilleak.models.mmdet_config import model_from_mmdet_config, spec_from_mmdet
from oilleak.models.presets import PRESETS, build_from_spec, build_model, preset_spec
from oilleak.parity import fixture_meta, fixture_targets
from oilleak.structures import SEM_IGNORE, Detections, ImageMeta, Targets
from tests.conftest import FIXTURE_NAMES


def shapes(model) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_tiny_presets_are_the_fixtures_models(fixtures_dir, name):
    """The tiny presets equal, value for value, what mmdet's config makes at the fixtures' widths."""
    fixture = torch.load(fixtures_dir / name, weights_only=True)
    preset = "detectors_htc_r50_tiny" if name.startswith("detectors") else "htc_r50_tiny"
    ours = preset_spec(ModelConfig(preset=preset, mask_merge="last"), num_classes=6)
    assert ours == spec_from_mmdet(fixture["model_config"])
    with torch.device("meta"):
        assert shapes(build_from_spec(ours)) == {k: tuple(v.shape) for k, v in fixture["state_dict"].items()}


def test_mmdet_reader_refuses_what_oilleak_lacks(fixtures_dir):
    config = torch.load(fixtures_dir / "htc_small.pt", weights_only=True)["model_config"]
    cases = [
        ({**config, "neck": {**config["neck"], "add_extra_convs": "on_input"}}, "model.neck.add_extra_convs"),
        ({**config, "roi_head": {**config["roi_head"], "interleaved": False}}, "model.roi_head.interleaved"),
        ({**config, "rpn_head": {**config["rpn_head"], "in_channels": 64}}, "model.rpn_head.in_channels"),
        ({**config, "backbone": {**config["backbone"], "type": "ResNeXt"}}, "model.backbone.type"),
        ({k: v for k, v in config.items() if k != "test_cfg"}, "model.test_cfg"),
    ]
    for model_dict, key in cases:
        with pytest.raises(OilleakError, match=key.replace(".", r"\.")):
            spec_from_mmdet(model_dict)


def test_semantic_classes_and_mask_merge_follow_the_mmdet_dict(fixtures_dir):
    config = torch.load(fixtures_dir / "htc_small.pt", weights_only=True)["model_config"]
    roi_head = {**config["roi_head"], "semantic_head": {**config["roi_head"]["semantic_head"], "num_classes": 183}}
    with torch.device("meta"):
        model = model_from_mmdet_config({**config, "roi_head": roi_head}, mask_merge="mean")
    assert model.roi_head.semantic_head.conv_logits.out_channels == 183
    assert model.roi_head.bbox_head[0].fc_cls.out_features == 7  # 6 classes + background
    assert model.roi_head.inference.mask_merge == "mean"


# ------------------------------------------------------------------------------------------------ init


def test_initialisation_follows_mmdet():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="detectors_htc_r50_tiny"), 6)

    def std(t):
        return t.detach().float().std().item()

    assert not model.neck.rfp_weight.weight.any() and not model.neck.rfp_weight.bias.any()
    sac = model.backbone.layer2[0].conv2
    assert not sac.switch.weight.any() and torch.all(sac.switch.bias == 1)
    assert not any(t.any() for t in (sac.weight_diff, sac.pre_context.weight, sac.post_context.weight, sac.offset_s.weight, sac.offset_l.weight))
    rpn = torch.cat([model.rpn_head.rpn_conv.weight.flatten(), model.rpn_head.rpn_reg.weight.flatten()])
    assert std(rpn) == pytest.approx(0.01, rel=0.1)
    for head in model.roi_head.bbox_head:
        assert std(head.fc_cls.weight) == pytest.approx(0.01, rel=0.1)
        assert std(head.fc_reg.weight) == pytest.approx(0.001, rel=0.2)
        fc = head.shared_fcs[0].weight
        bound = math.sqrt(6 / (fc.shape[0] + fc.shape[1]))  # Xavier-uniform
        assert fc.abs().max().item() <= bound and std(fc) == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert not head.shared_fcs[0].bias.any()
    lateral = model.neck.lateral_convs[0].conv.weight
    assert std(lateral) == pytest.approx(math.sqrt(2 / (lateral.shape[0] + lateral.shape[1])), rel=0.1)  # Xavier


# ------------------------------------------------------------------------------------------------ contract


def synthetic_batch(num_classes: int = 6, sizes=((256, 256), (224, 256)), seed: int = 0):
    """Normalised noise images padded to /32 with a few rectangular objects each; targets as collate makes them."""
    g = torch.Generator().manual_seed(seed)
    pad_h = max(math.ceil(h / 32) * 32 for h, _ in sizes)
    pad_w = max(math.ceil(w / 32) * 32 for _, w in sizes)
    images = torch.zeros(len(sizes), 3, pad_h, pad_w)
    metas, targets = [], []
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        boxes, masks = [], []
        for _ in range(3):
            x1, y1 = torch.randint(0, w // 2, (1,), generator=g).item(), torch.randint(0, h // 2, (1,), generator=g).item()
            x2, y2 = x1 + torch.randint(16, w // 2, (1,), generator=g).item(), y1 + torch.randint(16, h // 2, (1,), generator=g).item()
            mask = torch.zeros(h, w, dtype=torch.bool)
            mask[y1:y2, x1:x2] = True
            boxes.append([x1, y1, x2, y2])
            masks.append(mask)
        labels = torch.randint(0, num_classes, (3,), generator=g)
        sem_seg = torch.full((pad_h, pad_w), SEM_IGNORE, dtype=torch.uint8)
        sem_seg[:h, :w] = 0
        for mask, label in zip(masks, labels):
            sem_seg[:h, :w][mask] = label + 1
        targets.append(Targets(torch.tensor(boxes, dtype=torch.float32), labels, torch.stack(masks), sem_seg))
        metas.append(ImageMeta(i, f"synthetic{i}.png", ori_shape=(2 * h, 2 * w), img_shape=(h, w), pad_shape=(math.ceil(h / 32) * 32, math.ceil(w / 32) * 32), scale_factor=(0.5, 0.5)))
    return images, metas, targets


def loss_step(model, images, metas, targets):
    """One loss + backward; returns the trainable parameters by name."""
    losses = model.train()(images, metas, targets)
    expected_keys = {"loss_rpn_cls", "loss_rpn_bbox", "loss_semantic_seg"}
    expected_keys |= {f"s{t}.{k}" for t in range(3) for k in ("loss_cls", "acc", "loss_bbox", "loss_mask")}
    assert set(losses) == expected_keys
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())
    total_loss(losses).backward()
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", ["detectors_htc_r50_tiny", "htc_r50_tiny"])
def test_loss_step_on_a_synthetic_batch_sends_finite_gradients_everywhere(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset), 6)
    trainable = loss_step(model, *synthetic_batch())
    assert [name for name, p in trainable.items() if p.grad is None] == []
    assert [name for name, p in trainable.items() if not torch.isfinite(p.grad).all()] == []
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    stems = ("backbone.", "neck.rfp_modules.0.") if preset.startswith("detectors") else ("backbone.",)
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(tuple(s + p for s in stems for p in ("conv1", "bn1", "layer1.")))}


@pytest.mark.parametrize("preset,fixture_name", [("detectors_htc_r50_tiny", "detectors_htc_small.pt"), ("htc_r50_tiny", "htc_small.pt")])
def test_every_trainable_parameter_learns(fixtures_dir, preset, fixture_name):
    """Not one gradient is exactly zero. From scratch some are, by construction (SAC's switch starts at 1,
    which multiplies its dilation-3 branch by 0), so this uses the fixture's random weights and image."""
    fixture = torch.load(fixtures_dir / fixture_name, weights_only=True)
    model = build_model(ModelConfig(preset=preset), 6)
    model.load_state_dict(fixture["state_dict"])
    trainable = loss_step(model, fixture["inputs"]["batch_inputs"], [fixture_meta(fixture)], [fixture_targets(fixture)])
    assert [name for name, p in trainable.items() if not p.grad.any()] == []
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())


def test_train_mode_keeps_backbone_batchnorm_frozen():
    model = build_model(ModelConfig(preset="detectors_htc_r50_tiny"), 6).train()
    norms = [m for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    assert model.roi_head.training and model.rpn_head.training


def test_total_loss_sums_only_losses():
    losses = {"loss_rpn_cls": torch.tensor(1.0), "s0.loss_cls": torch.tensor(2.0), "s0.acc": torch.tensor(50.0)}
    assert total_loss(losses).item() == 3.0


def test_forward_dispatches_on_the_mode():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="htc_r50_tiny", max_per_img=20), 6)
    images, metas, _ = synthetic_batch()
    with pytest.raises(ValueError, match="targets"):
        model.train()(images, metas)
    detections = model.eval()(images, metas)
    assert len(detections) == 2 and all(isinstance(d, Detections) for d in detections)
    for det, meta in zip(detections, metas):
        assert 0 < len(det) <= 20
        assert det.masks.shape == (len(det), *meta.ori_shape) and det.masks.dtype == torch.bool
        assert torch.all(det.scores[:-1] >= det.scores[1:])
        assert det.boxes[:, [0, 2]].max() <= meta.ori_shape[1] and det.boxes[:, [1, 3]].max() <= meta.ori_shape[0]


def test_all_presets_build():
    with torch.device("meta"):
        for name in PRESETS:
            model = build_model(ModelConfig(preset=name), 3)
            assert model.roi_head.bbox_head[0].fc_cls.out_features == 4
            assert model.roi_head.semantic_head.conv_logits.out_channels == 4


def test_the_config_accepts_exactly_the_presets_that_exist():
    # config.py (bottom layer) cannot import the models, so it keeps its own list of names
    assert sorted(CONFIG_PRESETS) == sorted(PRESETS)
