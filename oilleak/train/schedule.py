"""The optimiser and learning-rate schedule: mmdetection's 1x unless the config says otherwise.

SGD, lr 0.02 for a total batch of 16, momentum 0.9, weight decay 1e-4 on every trainable parameter;
linear warmup over the first ``warmup_iters`` iterations from ``warmup_ratio`` x lr, then either x ``gamma``
at each milestone epoch (``lr_schedule: step``, mmdetection's; the default with loaded weights) or a half
cosine down to ``min_lr_ratio`` x lr over the run's progress (``lr_schedule: cosine``; the default from
random weights). The lr is a closed-form function of (iteration, epoch, progress), so resuming needs
nothing but the counters a checkpoint keeps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from oilleak.config import TrainConfig


def from_random_weights(cfg: TrainConfig) -> bool:
    """Whether the run starts from random weights (a resumed run: whether the run it resumes did)."""
    return not (cfg.load_from or cfg.backbone_weights)


def resolve_lr_schedule(cfg: TrainConfig) -> str:
    """"step" or "cosine": what ``train.lr_schedule`` means for this run ("auto": cosine from random weights)."""
    if cfg.lr_schedule != "auto":
        return cfg.lr_schedule
    return "cosine" if from_random_weights(cfg) else "step"


def schedule_text(train: TrainConfig) -> str:
    """What the lr does after warm-up, and when the run ends."""
    end = f"{train.epochs} epochs"
    if train.time_budget_s is not None:
        end = f"{train.time_budget_s:g} s of training or {end}, whichever comes first"
    if resolve_lr_schedule(train) == "cosine":
        return f"then cosine to {train.min_lr_ratio:g} x lr over {end} (train.lr_schedule: {train.lr_schedule})"
    milestones = ", ".join(str(m) for m in train.milestones if m < train.epochs)
    plural = "s" if "," in milestones else ""
    steps = f"x {train.gamma:g} after epoch{plural} {milestones}" if milestones else "constant lr"
    return f"then {steps} (train.lr_schedule: {train.lr_schedule}), {end}"


def warmup_factor(iteration: int, cfg: TrainConfig) -> float:
    """mmdetection 3's LinearLR: ``ratio`` at iteration 0 rising linearly to 1 at ``warmup_iters - 1``."""
    if iteration >= cfg.warmup_iters - 1:
        return 1.0
    return cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * iteration / (cfg.warmup_iters - 1)


def step_factor(epoch: int, cfg: TrainConfig) -> float:
    """MultiStepLR by epoch: epoch (0-based) ``m`` and later run at ``gamma`` x lr for each milestone ``m``."""
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


def cosine_factor(progress: float, cfg: TrainConfig) -> float:
    """1 at progress 0, ``min_lr_ratio`` at progress 1 (and after), along a half cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_progress(iteration: int, total_iters: int, trained_s: float, cfg: TrainConfig) -> float:
    """How far the run is, 0..1: its iterations over all its epochs' iterations, or its training time over
    ``time_budget_s``, whichever ends it first."""
    progress = iteration / max(total_iters, 1)
    if cfg.time_budget_s is not None:
        progress = max(progress, trained_s / cfg.time_budget_s)
    return progress


def lr_at(base_lr: float, iteration: int, epoch: int, cfg: TrainConfig, progress: float = 0.0) -> float:
    schedule = cosine_factor(progress, cfg) if resolve_lr_schedule(cfg) == "cosine" else step_factor(epoch, cfg)
    return base_lr * warmup_factor(iteration, cfg) * schedule


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
