"""Weight import: torchvision ImageNet ResNets, mmdet checkpoints and bare state dicts, with a load report."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from oilleak.config import Config, DataConfig
from oilleak.errors import OilleakError
from oilleak.files import atomic_write
from oilleak.models.checkpoint import LoadReport, load_torchvision_resnet, load_weights, save_checkpoint
from oilleak.models.layers import ConvAWS2d
from oilleak.models.resnet import ResNet
from oilleak.models.rfp import RFP

DETECTORS_SAC = (False, True, True, True)


@pytest.fixture(scope="module")
def torchvision_resnet50(tmp_path_factory) -> tuple[torchvision.models.ResNet, Path]:
    """An untrained torchvision ResNet-50 with random BN statistics and affines (so a wrong mapping shows),
    saved like torchvision's ImageNet file (a bare state dict)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(1.0, 4.0)  # keeps activations in range through 16 blocks
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return net, path


def torchvision_features(net: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    feats = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        x = layer(x)
        feats.append(x)
    return feats


def assert_features_close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    for level, (a, b) in enumerate(zip(ours, ref, strict=True)):
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel <= 1e-4, f"C{level + 2}: {rel}"


@torch.inference_mode()
def test_torchvision_resnet50_into_both_detectors_resnets(torchvision_resnet50):
    net, path = torchvision_resnet50
    trunk = nn.ModuleDict(
        {
            "backbone": ResNet(use_aws=True, stage_with_sac=DETECTORS_SAC),
            "neck": RFP(
                in_channels=[256, 512, 1024, 2048],
                out_channels=256,
                rfp_backbone=ResNet(use_aws=True, stage_with_sac=DETECTORS_SAC, rfp_inplanes=256),
                aspp_out_channels=64,
            ),
        }
    ).eval()
    report = load_torchvision_resnet(trunk, path)

    tv_keys = [k for k in net.state_dict() if not k.startswith("fc.")]
    assert sorted(report.loaded) == sorted([f"backbone.{k}" for k in tv_keys] + [f"neck.rfp_modules.0.{k}" for k in tv_keys])
    assert report.unexpected == ["fc.weight", "fc.bias"] and report.skipped == []
    aws_convs = [n for n, m in trunk.named_modules() if isinstance(m, ConvAWS2d)]
    assert len(report.derived) == 2 * len(aws_convs) == 2 * 2 * 53  # gamma + beta of 53 convs per ResNet
    # SAC extras (13 SAC convs x 11 tensors) and rfp_conv (3 x 2) per ResNet keep their init; the FPN, ASPP
    # and rfp_weight are outside the ResNets and not counted
    assert len(report.missing) == 2 * 13 * 11 + 3 * 2
    assert all(report.reason(k) for k in report.missing + report.unexpected)
    assert report.unexplained() == {"skipped": [], "missing": [], "unexpected": []}
    assert float(trunk["backbone"].layer2[0].conv2.switch.bias) == 1.0  # identity init kept

    x = torch.randn(1, 3, 128, 160)
    ref = torchvision_features(net, x)
    assert_features_close(trunk["backbone"](x), ref)
    assert_features_close(trunk["neck"].rfp_modules[0](x), ref)  # without feedback it is the same network


@torch.inference_mode()
def test_torchvision_resnet50_into_a_plain_resnet_is_exact(torchvision_resnet50):
    net, path = torchvision_resnet50
    plain = ResNet(use_aws=False).eval()
    report = load_torchvision_resnet(plain, path)
    assert report.missing == [] and report.derived == [] and report.unexpected == ["fc.weight", "fc.bias"]
    x = torch.randn(1, 3, 96, 64)
    for a, b in zip(plain(x), torchvision_features(net, x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "fc.weight" in report.format() and "torchvision's ImageNet classifier" in report.format()


def test_torchvision_loader_rejects_other_files(tmp_path):
    detector_like = tmp_path / "detector.pth"
    torch.save({"meta": {}, "state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, detector_like)
    with pytest.raises(OilleakError, match="not a torchvision ResNet"):
        load_torchvision_resnet(ResNet(base_channels=4, use_aws=False), detector_like)
    resnet_file = tmp_path / "resnet.pth"
    torch.save(ResNet(base_channels=4, use_aws=False).state_dict(), resnet_file)
    with pytest.raises(OilleakError, match="no ResNet"):
        load_torchvision_resnet(nn.ModuleDict({"head": nn.Linear(2, 2)}), resnet_file)


def toy_detector(num_classes: int) -> nn.Module:
    """A stand-in with mmdet's head names: a tiny AWS ResNet and one box head stage."""
    stage = nn.ModuleDict({"fc_cls": nn.Linear(8, num_classes + 1), "fc_reg": nn.Linear(8, 4)})
    return nn.ModuleDict(
        {
            "backbone": ResNet(base_channels=4, use_aws=True, stage_with_sac=DETECTORS_SAC),
            "roi_head": nn.ModuleDict({"bbox_head": nn.ModuleList([stage])}),
        }
    )


def test_mmdet_checkpoint_with_module_prefix_and_optimizer_loads_everything(tmp_path):
    torch.manual_seed(0)
    source = toy_detector(6)
    state = {f"module.{k}": v + torch.rand_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "mmdet.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": state, "optimizer": {"state": {}}}, path)
    target = toy_detector(6)
    report = load_weights(target, path)
    assert len(report.loaded) == len(state) and report.skipped == report.missing == report.unexpected == []
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[f"module.{key}"]), key
    assert report.format().startswith(f"weights from {path}: {len(state)} tensors loaded, 0 skipped")


def test_oilleak_checkpoint_loads_through_the_same_function(tmp_path):
    torch.manual_seed(1)
    source = toy_detector(6)
    path = tmp_path / "oilleak.pth"
    save_checkpoint(path, model=source, config=Config(data=DataConfig(data_root="data", classes=list("abcdef"))))
    target = toy_detector(6)
    report = load_weights(target, path)
    assert len(report.loaded) == len(source.state_dict())
    assert (report.skipped, report.missing, report.unexpected) == ([], [], [])
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


def test_other_class_count_skips_exactly_the_class_layers_and_keeps_their_init():
    coco = toy_detector(80).state_dict()
    target = toy_detector(6)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_weights(target, coco)
    fc_cls = "roi_head.bbox_head.0.fc_cls"
    assert report.skipped == [(f"{fc_cls}.weight", (81, 8), (7, 8)), (f"{fc_cls}.bias", (81,), (7,))]
    assert report.unexplained() == {"skipped": [], "missing": [], "unexpected": []}
    assert torch.equal(target.state_dict()[f"{fc_cls}.weight"], before[f"{fc_cls}.weight"])
    assert torch.equal(target.state_dict()["roi_head.bbox_head.0.fc_reg.weight"], coco["roi_head.bbox_head.0.fc_reg.weight"])
    text = report.format()
    assert "skipped 2 (expected: class-dependent layer" in text and "(81, 8)" not in text.split("\n")[0]


def test_unexplained_differences_are_listed_with_shapes():
    state = toy_detector(6).state_dict()
    state["roi_head.bbox_head.0.fc_reg.weight"] = torch.zeros(8, 8)  # a broken file, not a class change
    state["roi_head.bbox_head.0.fc_extra.weight"] = torch.zeros(1)
    del state["backbone.layer4.0.conv2.weight_diff"]
    report = load_weights(toy_detector(6), state)
    assert report.unexplained() == {
        "skipped": ["roi_head.bbox_head.0.fc_reg.weight"],
        "missing": [],  # weight_diff is a SAC extra: allowed to keep its init
        "unexpected": ["roi_head.bbox_head.0.fc_extra.weight"],
    }
    text = report.format()
    assert "skipped roi_head.bbox_head.0.fc_reg.weight: checkpoint (8, 8) vs model (4, 8)  <- unexpected" in text
    assert "unexpected roi_head.bbox_head.0.fc_extra.weight  <- unexpected" in text


@torch.inference_mode()
def test_gamma_beta_derived_when_a_plain_resnet_checkpoint_meets_aws_convs():
    torch.manual_seed(0)
    plain = ResNet(base_channels=4, use_aws=False)
    aws = ResNet(base_channels=4, use_aws=True)
    report = load_weights(aws, {f"module.{k}": v for k, v in plain.state_dict().items()})
    assert len(report.derived) == 2 * 53 and report.missing == []
    conv = aws.layer3[2].conv2
    torch.testing.assert_close(conv.standardized_weight(), plain.layer3[2].conv2.weight, rtol=1e-5, atol=1e-6)


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(OilleakError, match="does not exist"):
        load_weights(nn.Linear(1, 1), tmp_path / "missing.pth")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(OilleakError, match="not a dict"):
        load_weights(nn.Linear(1, 1), listed)
    with pytest.raises(OilleakError, match="not tensors"):
        load_weights(nn.Linear(1, 1), {"epoch": 3, "model": {"weight": torch.zeros(1, 1)}})
    with pytest.raises(OilleakError, match="'weight' is torch.int64"):
        load_weights(nn.Linear(1, 1), {"weight": torch.zeros(1, 1, dtype=torch.long)})


def test_report_reasons_cover_the_documented_cases():
    assert LoadReport.reason("roi_head.mask_head.2.conv_logits.bias")
    assert LoadReport.reason("roi_head.semantic_head.conv_logits.weight")
    assert LoadReport.reason("neck.rfp_modules.0.layer3.0.rfp_conv.weight")
    assert LoadReport.reason("roi_head.bbox_head.1.fc_reg.weight") is None
    assert LoadReport.reason("backbone.layer2.0.conv2.weight") is None


def test_mmdet_checkpoint_in_another_class_order_is_permuted_into_the_configs(fixtures_dir):
    """mmdetection's label k is the k-th class of its dataset_meta. A checkpoint trained with the same classes in
    another order loads with its class rows moved by name: the box classifiers (background stays last), the mask
    logits and the semantic logits (background first), so the model equals the one trained in config order."""
    from oilleak.models.mmdet_config import model_from_mmdet_config

    fixture = torch.load(fixtures_dir / "htc_small.pt", weights_only=True)
    truth = fixture["state_dict"]  # taken as trained in the config's order
    classes = ["oil", "rust", "crack", "dirt", "leak", "stain"]
    trained = ["leak", "oil", "stain", "crack", "rust", "dirt"]
    idx = [classes.index(name) for name in trained]  # the checkpoint's label j is the config's class idx[j]
    permuted = dict(truth)
    for t in range(3):
        for part in ("weight", "bias"):
            cls = f"roi_head.bbox_head.{t}.fc_cls.{part}"
            permuted[cls] = truth[cls][idx + [6]]  # background row 6 stays last
            mask = f"roi_head.mask_head.{t}.conv_logits.{part}"
            permuted[mask] = truth[mask][idx]
    for part in ("weight", "bias"):
        sem = f"roi_head.semantic_head.conv_logits.{part}"
        permuted[sem] = truth[sem][[0] + [i + 1 for i in idx]]  # channel 0 background, class k at k + 1
    assert not torch.equal(permuted["roi_head.bbox_head.0.fc_cls.weight"], truth["roi_head.bbox_head.0.fc_cls.weight"])
    checkpoint = {"meta": {"dataset_meta": {"classes": tuple(trained)}}, "state_dict": permuted}

    model = model_from_mmdet_config(fixture["model_config"])
    report = load_weights(model, checkpoint, classes=classes)
    assert not (report.skipped or report.missing or report.unexpected)
    assert "reordered from the checkpoint's order ['leak', 'oil'" in report.format()
    loaded = model.state_dict()
    for key, value in truth.items():
        assert torch.equal(loaded[key], value), key
    # without the class names nothing can be reordered: loaded as stored, and the report says nothing of it
    report = load_weights(model, checkpoint)
    assert "reordered" not in report.format()
    assert torch.equal(model.state_dict()["roi_head.bbox_head.0.fc_cls.weight"], permuted["roi_head.bbox_head.0.fc_cls.weight"])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_get_the_mode_of_any_other_file(tmp_path, umask):
    """A checkpoint is written to a temporary file and renamed: it must end with the mode
    a plain open() gives (0644 under umask 022), like config.yaml and log.jsonl beside it."""
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "latest.pth") as f:  # how save_checkpoint writes
            torch.save({"x": torch.zeros(1)}, f)
        (tmp_path / "config.yaml").write_text("a: 1\n")
    finally:
        os.umask(old)
    mode = (tmp_path / "latest.pth").stat().st_mode & 0o777
    assert mode == (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o666 & ~umask
