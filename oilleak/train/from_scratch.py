"""Starting from random weights: give the frozen BatchNorms statistics before the first step.

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

import torch
from torch import Tensor, nn


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
