"""The optimiser and learning-rate schedule: mmdetection's 1x unless the config says otherwise.

SGD, lr 0.02 for a total batch of 16, momentum 0.9, weight decay 1e-4 on every trainable parameter;
linear warmup over the first ``warmup_iters`` iterations from ``warmup_ratio`` x lr, then x ``gamma`` at
each milestone epoch. The lr is a closed-form function of (iteration, epoch), so resuming needs nothing
but the iteration counter.
"""

from __future__ import annotations

import torch
from torch import nn

from oilleak.config import TrainConfig


def warmup_factor(iteration: int, cfg: TrainConfig) -> float:
    """mmdetection 3's LinearLR: ``ratio`` at iteration 0 rising linearly to 1 at ``warmup_iters - 1``."""
    if iteration >= cfg.warmup_iters - 1:
        return 1.0
    return cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * iteration / (cfg.warmup_iters - 1)


def step_factor(epoch: int, cfg: TrainConfig) -> float:
    """MultiStepLR by epoch: epoch (0-based) ``m`` and later run at ``gamma`` x lr for each milestone ``m``."""
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def lr_at(base_lr: float, iteration: int, epoch: int, cfg: TrainConfig) -> float:
    return base_lr * warmup_factor(iteration, cfg) * step_factor(epoch, cfg)


def choose_lr(cfg: TrainConfig, total_batch: int, auto_scale: bool) -> tuple[float, str]:
    """The base lr to train with, and a line telling the user which lr it is and why."""
    if auto_scale:
        lr = cfg.lr * total_batch / cfg.base_batch_size
        return lr, (
            f"lr {lr:g} (--auto-scale-lr: train.lr {cfg.lr:g} x total batch {total_batch} / "
            f"base batch {cfg.base_batch_size})"
        )
    line = f"lr {cfg.lr:g} for a total batch of {total_batch}"
    if total_batch * 4 <= cfg.base_batch_size:  # said before the first step, not after a divergence
        line = "warning: " + line + f", {cfg.base_batch_size // total_batch}x fewer images per step than train.lr is meant for"
    if total_batch != cfg.base_batch_size:
        scaled = cfg.lr * total_batch / cfg.base_batch_size
        line += (
            f" (train.lr is meant for a total batch of {cfg.base_batch_size}; pass --auto-scale-lr to train "
            f"with lr {scaled:g} instead, as the linear scaling rule suggests)"
        )
    return cfg.lr, line


def build_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.SGD:
    """SGD over the parameters that train; the frozen stem / stage 1 (requires_grad False) stay out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
