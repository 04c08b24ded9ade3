"""Starting from random weights: GroupNorm (the default there), BatchNorm that trains, or frozen BatchNorm with
measured statistics.

``train.backbone_norm`` "batch" (opt-in; "auto" picks it without loaded weights, ``resolve_backbone_norm``)
makes every backbone BatchNorm train on batch statistics and unfreezes the stem and stage 1
(``train_backbones``). With ``model.norm: group`` (what "auto" picks from random weights) there are no
statistics to freeze or measure; from random weights the stem and stage 1 train as well (``train_backbones``),
as in mmdetection's from-scratch GN configs. Frozen BatchNorm with statistics measured on a few batches at
the start (below) leaves the normalisation fixed while the random weights under it change fast in the first
hundreds of steps; the activations then drift by orders of magnitude and on BSData (full preset, 1333x800,
batch 2) the SAC offsets reached NaN at iteration 24 with the lr still at 0.001 in warm-up.
Trained BatchNorm re-normalises every step and does not drift.


DetectoRS keeps every backbone BatchNorm in eval mode while training (``norm_eval``, as mmdetection does):
its running statistics are meant to come from ImageNet. From random weights they are mean 0 / variance 1, so
each BatchNorm is the identity, and through ~100 weight-standardised convolutions (ConvAWS: unit-variance
filters) activations grow by orders of magnitude per block and overflow to inf / NaN in the first forward
pass. Running a few training batches through the network with the BatchNorms collecting statistics
(cumulative average, no gradients) sets them to what the data produces, after which the frozen-BN network
is well scaled and trains.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from oilleak.config import Config, ModelConfig, TrainConfig
from oilleak.models.resnet import ResNet
from oilleak.train.schedule import from_random_weights, schedule_text


def resolve_backbone_norm(cfg: TrainConfig) -> str:
    """"frozen" or "batch": what ``train.backbone_norm`` means for this run ("auto": frozen with weights)."""
    if cfg.backbone_norm != "auto":
        return cfg.backbone_norm
    return "batch" if from_random_weights(cfg) else "frozen"


def resolve_model_norm(config: Config, resumed: dict[str, Any] | None = None) -> str:
    """"batch" or "group": what ``model.norm`` means for this run ("auto": ``ModelConfig.resolved_norm``), or,
    when resuming with "auto", the norm of the run being resumed, which may have chosen it under an older default."""
    if config.model.norm == "auto" and resumed is not None:
        return ModelConfig(norm=resumed["config"].get("model", {}).get("norm", "batch")).resolved_norm()
    return config.model.resolved_norm(random_weights=from_random_weights(config.train))


WEIGHTS = {"random": "random weights (no train.load_from / train.backbone_weights)", "loaded": "loaded weights",
           "resumed": "the weights of the run being resumed"}


def recipe_line(config: Config, weights: str, calibrated: int = 0) -> str:
    """The line said before the first step: how this run normalises and augments its data, and why.
    ``weights``: "random", "loaded" or "resumed"; ``calibrated``: the batches frozen BatchNorm was measured on."""
    data, train = config.data, config.train
    random_weights = from_random_weights(train)
    if resolve_model_norm(config) == "group":
        norm = ("GroupNorm (model.norm: group, what auto picks from random weights), nothing frozen" if random_weights
                else "GroupNorm (model.norm: group), stem and stage 1 frozen")
    elif resolve_backbone_norm(train) == "batch":
        norm = f"BatchNorm on batch statistics, nothing frozen (train.backbone_norm: {train.backbone_norm})"
    elif weights == "random":
        norm = (f"frozen BatchNorm with statistics measured on {calibrated} training batches, stem and stage 1 "
                f"frozen (train.backbone_norm: {train.backbone_norm}; model.norm: auto or group trains from random "
                "weights more stably, BENCHMARKS.md)")
    else:
        norm = f"mmdetection's frozen BatchNorm, stem and stage 1 frozen (train.backbone_norm: {train.backbone_norm})"
    augment = [f"flip p {data.flip_prob:g}"]
    if data.multi_scale:
        augment.append(f"{len(data.multi_scale)} scales (data.multi_scale)")
    if data.photometric:
        augment.append("photometric distortion (data.photometric)")
    return (f"recipe: {WEIGHTS[weights]}; {norm}; {', '.join(augment)}; warm-up {train.warmup_iters} iterations, "
            + schedule_text(train))


def train_backbones(model: nn.Module) -> None:
    """Every ResNet in ``model`` (backbone and RFP's second one): BatchNorm on batch statistics in training,
    no frozen stages. Evaluation still uses the running statistics, so checkpoints load into any model."""
    for module in model.modules():
        if isinstance(module, ResNet):
            module.norm_eval = False
            module.frozen_stages = -1
            for param in module.parameters():
                param.requires_grad_(True)


@torch.no_grad()
def calibrate_frozen_batchnorm(model: nn.Module, images: Iterable[Tensor]) -> int:
    """Set every BatchNorm's running statistics from ``images`` (batches through ``model.extract_feat``);
    returns the number of batches used. The model's train / eval state and BN momenta are restored."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    was_training = model.training
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batches
        norm.train()
    count = 0
    try:
        for batch_images in images:
            model.extract_feat(batch_images)
            count += 1
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    return count
