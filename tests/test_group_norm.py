"""``model.norm: group``: GroupNorm in both ResNets and the HTC mask / semantic heads; it trains, is saved with
the checkpoint and rebuilt from it, and weights of the other kind of norm are refused with the fix. "auto", the
default, picks it for a training from random weights and BatchNorm everywhere else."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch import nn

from oilleak.config import ModelConfig, config_from_dict
from oilleak.errors import OilleakError
from oilleak.models.checkpoint import load_weights, model_from_checkpoint, save_checkpoint
from oilleak.models.presets import build_model
from oilleak.train.from_scratch import train_backbones
from oilleak.train.loop import TrainOptions, run_training
from tests.test_detector import loss_step, synthetic_batch
from tests.test_train_loop import make_shapes, quiet, shapes_config

GN = ModelConfig(preset="detectors_htc_r50_tiny", norm="group")


def config(norm: str):
    return config_from_dict({"data": {"data_root": ".", "classes": ["a", "b"]},
                             "model": {"preset": "detectors_htc_r50_tiny", "norm": norm}})


def test_group_norm_replaces_every_batchnorm_and_sits_in_the_heads():
    model = build_model(GN, 2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    keys = model.state_dict().keys()
    # mmdet's names for GN (ResNet gn1.., ConvModule .gn), so its GN checkpoints' keys are these
    for key in ("backbone.gn1.weight", "backbone.layer1.0.gn3.bias", "backbone.layer2.0.downsample.1.weight",
                "neck.rfp_modules.0.layer4.2.gn2.weight", "roi_head.mask_head.1.convs.3.gn.weight",
                "roi_head.mask_head.1.conv_res.gn.weight", "roi_head.semantic_head.conv_embedding.gn.weight"):
        assert key in keys, key
    assert "roi_head.mask_head.0.convs.0.conv.bias" not in keys  # no bias before a norm, as mmcv's ConvModule
    assert model.backbone.gn1.num_groups == 16  # the tiny stem's 16 channels; 32 groups from 32 channels on
    assert model.backbone.layer4[0].gn3.num_groups == 32


def test_group_norm_model_trains_a_step():
    torch.manual_seed(0)
    model = build_model(GN, 6)
    train_backbones(model)  # from random weights nothing is frozen
    trainable = loss_step(model, *synthetic_batch())
    assert [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()] == []
    assert trainable["backbone.gn1.weight"].grad.abs().sum() > 0


def test_group_norm_checkpoint_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(1)
    model = build_model(GN, 2).eval()
    save_checkpoint(tmp_path / "gn.pth", model=model, config=config("group"))
    loaded, cfg = model_from_checkpoint(tmp_path / "gn.pth")
    assert cfg.model.norm == "group"
    images, metas, _ = synthetic_batch(num_classes=2)
    with torch.no_grad():
        a, b = model(images, metas), loaded(images, metas)
    assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(a, b))
    assert load_weights(build_model(GN, 2), tmp_path / "gn.pth").unexplained() == {
        "skipped": [], "missing": [], "unexpected": []}


def test_weights_of_the_other_norm_are_refused_with_the_fix(tmp_path):
    save_checkpoint(tmp_path / "gn.pth", model=build_model(GN, 2), config=config("group"))
    with pytest.raises(OilleakError, match=r"GroupNorm backbone .* model.norm: batch; set model.norm: group"):
        model_from_checkpoint(tmp_path / "gn.pth", overrides=["model.norm=batch"])
    bn = build_model(ModelConfig(preset="detectors_htc_r50_tiny"), 2).state_dict()
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": bn}, tmp_path / "mmdet.pth")
    with pytest.raises(OilleakError, match=r"BatchNorm backbone .* model.norm: group; set model.norm: batch"):
        load_weights(build_model(GN, 2), tmp_path / "mmdet.pth")
    assert load_weights(build_model(ModelConfig(preset="detectors_htc_r50_tiny"), 2), tmp_path / "mmdet.pth").loaded


def test_auto_is_group_norm_only_for_a_training_from_random_weights():
    assert ModelConfig().norm == "auto"
    assert ModelConfig().resolved_norm() == "batch"  # mmdetection's checkpoints, benchmarks, parity
    assert ModelConfig().resolved_norm(random_weights=True) == "group"
    assert ModelConfig(norm="batch").resolved_norm(random_weights=True) == "batch"
    assert ModelConfig(norm="group").resolved_norm() == "group"
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model(ModelConfig(preset="htc_r50_tiny"), 2).modules())


def test_a_training_from_random_weights_records_group_norm_and_test_rebuilds_it(tmp_path):
    shapes = make_shapes(tmp_path / "shapes", images=2, size=96)
    run_training(shapes_config(shapes, tmp_path / "scratch"), TrainOptions(max_iters=1, device="cpu"), quiet())
    assert yaml.safe_load((tmp_path / "scratch" / "config.yaml").read_text())["model"]["norm"] == "group"
    model, cfg = model_from_checkpoint(tmp_path / "scratch" / "latest.pth")  # what test / predict / export do
    assert cfg.model.norm == "group"
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    # from loaded BatchNorm weights "auto" stays mmdetection's BatchNorm, and records it
    start = build_model(shapes_config(shapes, tmp_path).model, 2)
    save_checkpoint(tmp_path / "bn.pth", model=start, config=shapes_config(shapes, tmp_path))
    run_training(shapes_config(shapes, tmp_path / "loaded"),
                 TrainOptions(load_from=str(tmp_path / "bn.pth"), max_iters=1, device="cpu"), quiet())
    _, cfg = model_from_checkpoint(tmp_path / "loaded" / "latest.pth")
    assert cfg.model.norm == "batch"

    # a run from random weights that chose BatchNorm (the default before "auto") resumes with BatchNorm
    old = shapes_config(shapes, tmp_path / "old", train={"epochs": 2})
    old.model.norm = "batch"
    run_training(old, TrainOptions(max_iters=1, device="cpu"), quiet())
    result = run_training(shapes_config(shapes, tmp_path / "old", train={"epochs": 2}),
                          TrainOptions(resume=True, max_iters=2, device="cpu"), quiet())
    assert result.iterations == 2
    assert model_from_checkpoint(tmp_path / "old" / "latest.pth")[1].model.norm == "batch"
