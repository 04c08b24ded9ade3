"""Training from random weights: which backbone normalisation a run gets, and that "batch" really trains it."""

from __future__ import annotations

import torch
from torch import nn

from oilleak.config import ModelConfig, TrainConfig, config_from_dict
from oilleak.train.from_scratch import recipe_line, resolve_backbone_norm, train_backbones
from oilleak.models.presets import build_model
from oilleak.models.resnet import ResNet


def test_auto_is_mmdet_frozen_norm_with_weights_and_trained_norm_from_scratch():
    assert resolve_backbone_norm(TrainConfig()) == "frozen"  # the default, measured better on the shapes test
    assert resolve_backbone_norm(TrainConfig(backbone_norm="auto")) == "batch"
    assert resolve_backbone_norm(TrainConfig(backbone_norm="auto", load_from="x.pth")) == "frozen"
    assert resolve_backbone_norm(TrainConfig(backbone_norm="auto", backbone_weights="resnet50.pth")) == "frozen"
    assert resolve_backbone_norm(TrainConfig(backbone_norm="frozen")) == "frozen"
    assert resolve_backbone_norm(TrainConfig(load_from="x.pth", backbone_norm="batch")) == "batch"


def test_train_backbones_unfreezes_both_resnets_and_their_statistics_move():
    model = build_model(ModelConfig(preset="detectors_htc_r50_tiny"), num_classes=1)
    resnets = [m for m in model.modules() if isinstance(m, ResNet)]
    assert len(resnets) == 2  # the backbone and the RFP's second ResNet
    stem = resnets[0].bn1
    assert not resnets[0].conv1.weight.requires_grad  # mmdet's frozen stem, as built

    train_backbones(model)
    model.train()
    norms = [m for r in resnets for m in r.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(n.training for n in norms)
    assert all(p.requires_grad for r in resnets for p in r.parameters())
    before = stem.running_mean.clone()
    torch.manual_seed(0)
    model.extract_feat(torch.randn(1, 3, 96, 96) * 3 + 1)
    assert not torch.equal(stem.running_mean, before)  # batch statistics were used and collected

    model.eval()  # evaluation uses the running statistics, as with frozen BatchNorm
    assert not any(n.training for n in norms)


def test_the_recipe_line_says_what_the_run_does_and_why():
    def line(weights="random", calibrated=0, **sections):
        raw = {"data": {"data_root": ".", "classes": ["a"], **sections.get("data", {})},
               "model": sections.get("model", {}), "train": sections.get("train", {})}
        return recipe_line(config_from_dict(raw), weights, calibrated)

    assert line() == (  # the defaults from random weights: model.norm auto -> GroupNorm, lr_schedule auto -> cosine
        "recipe: random weights (no train.load_from / train.backbone_weights); GroupNorm (model.norm: group, what "
        "auto picks from random weights), nothing frozen; flip p 0.5; "
        "warm-up 500 iterations, then cosine to 0.01 x lr over 12 epochs (train.lr_schedule: auto)")
    assert line(calibrated=10, model={"norm": "batch"}) == (
        "recipe: random weights (no train.load_from / train.backbone_weights); frozen BatchNorm with statistics "
        "measured on 10 training batches, stem and stage 1 frozen (train.backbone_norm: frozen; model.norm: auto "
        "or group trains from random weights more stably, BENCHMARKS.md); flip p 0.5; "
        "warm-up 500 iterations, then cosine to 0.01 x lr over 12 epochs (train.lr_schedule: auto)")
    assert line(train={"epochs": 3, "milestones": [3], "lr_schedule": "step"}).endswith(
        "then constant lr (train.lr_schedule: step), 3 epochs")
    assert line(train={"time_budget_s": 900}).endswith(
        "then cosine to 0.01 x lr over 900 s of training or 12 epochs, whichever comes first (train.lr_schedule: auto)")
    assert line("loaded", train={"load_from": "x.pth"}).startswith(
        "recipe: loaded weights; mmdetection's frozen BatchNorm, stem and stage 1 frozen")
    assert line("loaded", train={"load_from": "x.pth"}).endswith(
        "then x 0.1 after epochs 8, 11 (train.lr_schedule: auto), 12 epochs")
    assert "BatchNorm on batch statistics, nothing frozen (train.backbone_norm: auto)" in line(
        model={"norm": "batch"}, train={"backbone_norm": "auto"})
    assert "; GroupNorm (model.norm: group, what auto picks from random weights), nothing frozen;" in line(
        model={"norm": "group"})
    resumed = line("resumed", model={"norm": "group"}, train={"load_from": "x.pth"})
    assert resumed.startswith("recipe: the weights of the run being resumed; GroupNorm") and "stem and stage 1 frozen" in resumed
    assert line(data={"multi_scale": [[512, 320], [640, 400]], "photometric": True}).endswith(
        "flip p 0.5, 2 scales (data.multi_scale), photometric distortion (data.photometric); warm-up 500 iterations, then cosine to 0.01 x lr over 12 epochs (train.lr_schedule: auto)")
