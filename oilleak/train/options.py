"""What a training is asked to do beyond its config (the command line), and what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from oilleak.config import Config


@dataclass
class TrainOptions:
    """What the command line adds to the config."""

    work_dir: Path | None = None  # default: config.train.work_dir
    load_from: str | None = None  # oilleak or mmdetection checkpoint to start from (default: train.load_from)
    backbone_weights: str | None = None  # torchvision ResNet-50 file (default: train.backbone_weights)
    resume: bool = False  # continue from <work_dir>/latest.pth
    resume_from: Path | None = None  # continue from this checkpoint
    auto_scale_lr: bool = False
    device: str | None = None  # "cpu" | "cuda"; default: cuda when available
    amp: bool = False
    max_iters: int | None = None  # stop (resumably) after this many steps in total
    time_budget_s: float | None = None  # stop (resumably) after this much training (default: train.time_budget_s)
    config_name: str = "your config"  # how messages refer to the config file


@dataclass
class TrainResult:
    work_dir: Path
    iterations: int
    epochs_done: int
    best: float | None  # best validation segm_mAP
    stopped_by: str | None  # None: finished; "max-iters", "time" (train.time_budget_s), "SIGINT", "SIGTERM"
    model: nn.Module  # the trained model (not wrapped in DistributedDataParallel)


def resolve_options(config: Config, options: TrainOptions) -> Config:
    """The config this run trains with: the command line's choices written into it (saved as config.yaml)."""
    config = config.model_copy(deep=True)
    if options.work_dir is not None:
        config.train.work_dir = str(options.work_dir)
    if options.load_from is not None:
        config.train.load_from = options.load_from
    if options.backbone_weights is not None:
        config.train.backbone_weights = options.backbone_weights
    if options.amp:
        config.train.amp = True
    if options.time_budget_s is not None:
        config.train.time_budget_s = options.time_budget_s
    return config
