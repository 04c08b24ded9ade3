"""Building a training run: the checked data and its loader, and the model with its starting weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from oilleak import distributed
from oilleak.config import Config
from oilleak.distributed import Runtime
from oilleak.train.from_scratch import calibrate_frozen_batchnorm, recipe_line, resolve_backbone_norm, train_backbones
from oilleak.train.sample_order import EpochBatches, train_loader
from oilleak.train.schedule import from_random_weights
from oilleak.train.state import seed_everything

if TYPE_CHECKING:
    from oilleak.data.dataset import CocoDataset

Note = Callable[..., None]  # prints on rank 0: note(text, markup=False)

NO_PRETRAINED_WARNING = (
    "[bold yellow]warning:[/] training from random weights: no --load-from and no --backbone-weights. "
    "Detectors trained from scratch need several times the 1x schedule (and normalisation that trains) to "
    "approach an ImageNet-pretrained start (He et al., 'Rethinking ImageNet Pre-training', 2019); with the "
    "1x schedule on a few hundred images expect a mask mAP far below a pretrained run, often near 0. "
    "Pass --backbone-weights resnet50-0676ba61.pth (torchvision's ImageNet ResNet-50, "
    "https://download.pytorch.org/models/resnet50-0676ba61.pth, what mmdetection's DetectoRS config starts "
    "from) or --load-from a COCO-trained DetectoRS / HTC checkpoint."
)


@dataclass
class TrainData:
    train_set: CocoDataset
    val_set: CocoDataset | None  # None: the val split lists no images (no evaluation, no best.pth)
    batches: EpochBatches  # which images each step of each epoch takes, on this rank
    loader: DataLoader


def build_data(config: Config, runtime: Runtime, config_name: str, note: Note) -> TrainData:
    """The datasets of the splits the dataset check loaded (their json is not read a second time)."""
    from oilleak.data.check import check_dataset
    from oilleak.data.dataset import CocoDataset, collate

    report = check_dataset(config.data, config_name=config_name)
    report.raise_if_failed()
    if report.warnings:  # among them "no validation split" when val is missing: no evaluation, no best.pth
        note(report.format_problems())
    data = config.data
    train_set = CocoDataset(report.splits["train"], data, train=True)
    val = report.splits["val"]
    batches = EpochBatches(
        len(train_set),
        batch_size=data.batch_size,
        seed=config.train.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        portrait=[r.width < r.height for r in train_set.records],  # AspectRatioBatchSampler's groups
    )
    loader = train_loader(train_set, batches, collate=collate, workers=data.workers,
                          pin_memory=runtime.device.type == "cuda")
    return TrainData(train_set, CocoDataset(val, data, train=False) if val.records else None, batches, loader)


def build_model(
    config: Config, checkpoint: dict[str, Any] | None, checkpoint_path: Path | None, data: TrainData,
    runtime: Runtime, note: Note,
) -> tuple[nn.Module, nn.Module]:
    """The bare model (for checkpoints and evaluation) and the one to train (wrapped in
    DistributedDataParallel under torchrun), with the weights of the ``checkpoint`` resumed (read from
    ``checkpoint_path``) or the starting ones."""
    from oilleak.models.checkpoint import check_weights_fit
    from oilleak.models.presets import build_model as build_detector

    cfg = config.train
    seed_everything(cfg.seed)  # the same initial weights on every rank and every run
    model = build_detector(config.model, config.num_classes)
    if checkpoint is not None:
        check_weights_fit(model, checkpoint["state_dict"], checkpoint_path, config, checkpoint.get("config"))
        model.load_state_dict(checkpoint["state_dict"])
    pretrained = checkpoint is not None or _load_initial_weights(model, config, note)
    model.to(runtime.device)
    weights = "resumed" if checkpoint is not None else "loaded" if pretrained else "random"
    calibrated = 0
    if config.model.norm == "group":
        if from_random_weights(cfg):  # GroupNorm has no statistics; a random stem has nothing to keep
            train_backbones(model)
    elif resolve_backbone_norm(cfg) == "batch":
        train_backbones(model)
    elif weights == "random":
        calibrated = _calibrate_batchnorm(model, data, cfg.seed, runtime)
    note(recipe_line(config, weights, calibrated))
    if not runtime.distributed:
        return model, model
    # Every trainable parameter gets a gradient in every step (a batch without ground truth reaches the mask
    # heads through an empty mask loss), so DDP need not search the graph for unused ones. Every BatchNorm is
    # frozen: its statistics (set from each rank's own batches when calibrated) are made rank 0's once here
    # instead of being broadcast before every forward.
    distributed.broadcast_buffers_from_main(model, runtime)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False,
                                      **distributed.NO_BUFFER_BROADCAST)
    return model, wrapped


def _load_initial_weights(model: nn.Module, config: Config, note: Note) -> bool:
    """Load --backbone-weights / --load-from; False when the model keeps its random init."""
    from oilleak.models.checkpoint import load_torchvision_resnet, load_weights

    cfg = config.train
    if cfg.backbone_weights:
        note(f"backbone weights from {cfg.backbone_weights}")
        note(load_torchvision_resnet(model, cfg.backbone_weights).format())
    if cfg.load_from:
        note(f"weights from {cfg.load_from}")
        note(load_weights(model, cfg.load_from, classes=config.data.classes).format())
    if not (cfg.backbone_weights or cfg.load_from):
        note(NO_PRETRAINED_WARNING, markup=True)
        return False
    return True


def _calibrate_batchnorm(model: nn.Module, data: TrainData, seed: int, runtime: Runtime, max_batches: int = 10) -> int:
    """Frozen BatchNorm's statistics from the first training batches; returns how many were used."""
    data.batches.set_position(0)
    data.train_set.set_epoch(0, seed)
    batches = (batch.images.to(runtime.device) for _, batch in zip(range(max_batches), data.loader))
    return calibrate_frozen_batchnorm(model, batches)
