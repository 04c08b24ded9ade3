"""``oilleak train``: one process (CPU or one GPU) or many (``torchrun``), mmdetection's 1x schedule.

Each step the ranks agree twice (a three-number all-reduce each time), after loading the batch and after
the forward pass, on whether any rank failed, got a non-finite loss, or was asked to stop (Ctrl-C /
SIGTERM), before any gradient is exchanged. So an exception on one rank ends every rank with a message
instead of leaving the others waiting in a collective, a NaN never reaches the weights or a checkpoint,
and a stop request ends all ranks at the same step boundary with a resumable ``latest.pth``. Failures
outside those two points (an out-of-memory error in backward, say) end the job through torchrun, which
stops the other ranks when one exits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import yaml
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from oilleak.config import Config, save_config
from oilleak import distributed
from oilleak.distributed import Runtime
from oilleak.train.from_scratch import (
    calibrate_frozen_batchnorm,
    recipe_line,
    resolve_backbone_norm,
    resolve_model_norm,
    train_backbones,
)
from oilleak.train.schedule import build_optimizer, choose_lr, from_random_weights, lr_at, run_progress, set_lr
from oilleak.train.stop_signals import StopSignals
from oilleak.train.sample_order import EpochBatches, train_loader
from oilleak.train.log import TrainLog
from oilleak.train.state import CheckpointFiles, capture_rng, existing_outputs, restore_rng, seed_everything
from oilleak.errors import OilleakError
from oilleak.models.detector import total_loss
from oilleak.structures import Batch

if TYPE_CHECKING:
    from oilleak.data.check import DataReport

BEST_METRIC = "segm_mAP"

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


class TrainingDiverged(OilleakError):
    """A loss term became NaN or infinite (or NaN reached a layer that checks for it); nothing from that
    step was applied or saved."""


DIVERGED_FIX = (
    "Clip gradients (--set train.grad_clip=35), lengthen train.warmup_iters, or lower train.lr (or drop "
    "--auto-scale-lr); from random weights with model.norm=batch, GroupNorm (model.norm=auto or group) trains "
    "more stably. Then start again"
)


def diverged_advice(last_good: Path | None, work_dir: Path) -> str:
    """What to do after a NaN stop: from the last good checkpoint, or, with none, in a fresh work dir (the
    stopped run's config.yaml and log.jsonl are there, and a fresh training never overwrites them)."""
    if last_good is not None:
        return f"the last good checkpoint is {last_good}. {DIVERGED_FIX} or --resume."
    return (f"no checkpoint was written yet. {DIVERGED_FIX} with another --work-dir, or after emptying {work_dir} "
            "(it holds this run's config and log, which a new training never overwrites).")


class _StopBeforeStep(Exception):
    """A stop was requested (a signal's name) or the time budget is spent ("time"), and this step cannot (or
    need not) run: save the state before it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class _AgreedStop(Exception):
    """Every rank raises this at the same step, so the process group can be left cleanly. ``echo``: the
    error repeats what rank 0 reports, so ranks other than 0 end quietly (exit 2) instead of printing it."""

    def __init__(self, error: BaseException, echo: bool = True) -> None:
        self.error = error
        self.echo = echo


def run_training(config: Config, options: TrainOptions, console: Console | None = None) -> TrainResult:
    runtime = distributed.start(options.device)
    console = console or Console()
    try:
        with StopSignals() as signals:
            result = Trainer(config, options, runtime, console, signals).run()
    except _AgreedStop as stop:
        distributed.stop(runtime)
        if stop.echo and not runtime.is_main:
            raise SystemExit(2) from None
        raise stop.error from None
    distributed.stop(runtime)
    return result


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


def _resume_path(work_dir: Path, options: TrainOptions) -> Path | None:
    if options.resume_from is not None:
        if not options.resume_from.is_file():
            raise OilleakError(f"--resume-from {options.resume_from}: no such checkpoint file")
        if existing_outputs(work_dir) and options.resume_from.resolve().parent != work_dir.resolve():
            raise OilleakError(
                f"--resume-from {options.resume_from}: the work dir {work_dir} holds another training, which "
                "oilleak never overwrites; pass --work-dir of the checkpoint's own training or an empty one"
            )
        return options.resume_from
    if options.resume:
        latest = work_dir / "latest.pth"
        if not latest.is_file():
            raise OilleakError(
                f"--resume: {latest} does not exist, so there is nothing to resume in {work_dir}; "
                "start without --resume, pass --work-dir of the run to continue, or --resume-from a checkpoint"
            )
        return latest
    found = existing_outputs(work_dir)
    if found:
        if "latest.pth" in found:
            advice = "Pass --resume to continue that training, or choose another --work-dir"
        else:  # a run that stopped before its first checkpoint
            advice = "It has no checkpoint to resume: choose another --work-dir, or delete those files"
        raise OilleakError(
            f"work dir {work_dir} already holds a training ({', '.join(found[:5])}); oilleak never overwrites it. "
            + advice
        )
    return None


class Trainer:
    def __init__(self, config: Config, options: TrainOptions, runtime: Runtime, console: Console, signals: StopSignals):
        self.options = options
        self.runtime = runtime
        self.console = console
        self.signals = signals
        self.config = config = resolve_options(config, options)
        self.cfg = cfg = config.train
        self.work_dir = Path(cfg.work_dir)
        self.amp = cfg.amp and runtime.device.type == "cuda"
        self.note(f"training on {runtime.world_size} process(es), device {runtime.device}")
        if cfg.amp and not self.amp:
            self.note("note: --amp / train.amp is ignored on CPU (fp16 autocast is for CUDA); training in fp32")

        resume_path = _resume_path(self.work_dir, options)
        distributed.barrier(runtime)  # every rank has looked at the work dir before rank 0 writes into it
        self._build_data(self._check_data())
        checkpoint = self._load_resume_checkpoint(resume_path) if resume_path else None
        # the norm chosen, not "auto", goes into config.yaml and the checkpoints: they rebuild this model
        config.model.norm = resolve_model_norm(config, checkpoint)
        self._build_model(checkpoint)

        total_batch = runtime.world_size * config.data.batch_size
        self.base_lr, lr_line = choose_lr(cfg, total_batch, options.auto_scale_lr)
        self.note(lr_line)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg, self.base_lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.files = CheckpointFiles(self.work_dir, keep=cfg.keep_checkpoints)

        self.epoch, self.step_in_epoch, self.iteration = 0, 0, 0
        # Seconds spent in training steps, resumes included; the ranks agree on it every step (their mean), so
        # they all stop for the time budget at the same step.
        self.trained_s = 0.0
        self.best: float | None = None
        self._evaluated = False  # whether this run evaluated (for the closing advice)
        self._evaluated_at: int | None = None  # the iteration of the last evaluation
        if checkpoint is not None:
            self._restore_train_state(checkpoint["train_state"], resume_path, total_batch)
        else:
            seed_everything(cfg.seed + 1 + runtime.rank)  # each rank's own stream for the RoI samplers
        self.boundary_rng = capture_rng()
        if runtime.is_main:
            self._write_config(resume_path)

    # ------------------------------------------------------------------------------------------ setup

    def note(self, text: str, markup: bool = False) -> None:
        if self.runtime.is_main:
            self.console.print(text, highlight=False, markup=markup, soft_wrap=True)

    def _check_data(self) -> DataReport:
        from oilleak.data.check import check_dataset

        report = check_dataset(self.config.data, config_name=self.options.config_name)
        report.raise_if_failed()
        if report.warnings:  # among them "no validation split" when val is missing: no evaluation, no best.pth
            self.note(report.format_problems())
        return report

    def _build_data(self, report: DataReport) -> None:
        """The datasets of the splits the check loaded (their json is not read a second time)."""
        from oilleak.data.dataset import CocoDataset, collate

        data = self.config.data
        self.train_set = CocoDataset(report.splits["train"], data, train=True)
        val = report.splits["val"]
        self.val_set = CocoDataset(val, data, train=False) if val.records else None
        self.batches = EpochBatches(
            len(self.train_set),
            batch_size=data.batch_size,
            seed=self.config.train.seed,
            rank=self.runtime.rank,
            world_size=self.runtime.world_size,
            portrait=[r.width < r.height for r in self.train_set.records],  # AspectRatioBatchSampler's groups
        )
        self.loader = train_loader(
            self.train_set, self.batches, collate=collate, workers=data.workers,
            pin_memory=self.runtime.device.type == "cuda",
        )

    def _load_resume_checkpoint(self, path: Path) -> dict[str, Any]:
        from oilleak.models.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
        if "train_state" not in checkpoint:
            raise OilleakError(
                f"{path} holds weights but no training state, so it cannot be resumed; "
                f"start a new training from its weights with --load-from {path}"
            )
        return checkpoint

    def _build_model(self, checkpoint: dict[str, Any] | None) -> None:
        from oilleak.models.presets import build_model

        seed_everything(self.cfg.seed)  # the same initial weights on every rank and every run
        model = build_model(self.config.model, self.config.num_classes)
        if checkpoint is not None:
            missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
            if missing or unexpected:
                raise OilleakError(
                    f"the checkpoint to resume does not fit model.preset {self.config.model.preset} with "
                    f"{self.config.num_classes} classes: {len(missing)} missing keys (e.g. {missing[:3]}), "
                    f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); resume with the config it was trained with"
                )
        pretrained = checkpoint is not None or self._load_initial_weights(model)
        model.to(self.runtime.device)
        weights = "resumed" if checkpoint is not None else "loaded" if pretrained else "random"
        calibrated = 0
        if self.config.model.norm == "group":
            if from_random_weights(self.cfg):  # GroupNorm has no statistics; a random stem has nothing to keep
                train_backbones(model)
        elif resolve_backbone_norm(self.cfg) == "batch":
            train_backbones(model)
        elif weights == "random":
            calibrated = self._calibrate_batchnorm(model)
        self.note(recipe_line(self.config, weights, calibrated))
        self.module = model  # the bare model: checkpoints and evaluation
        if self.runtime.distributed:
            # Every trainable parameter gets a gradient in every step (a batch without ground truth reaches the
            # mask heads through an empty mask loss), so DDP need not search the graph for unused ones. Every
            # BatchNorm is frozen: its statistics (set from each rank's own batches when calibrated) are made
            # rank 0's once here instead of being broadcast before every forward.
            distributed.broadcast_buffers_from_main(model, self.runtime)
            device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False,
                                            **distributed.NO_BUFFER_BROADCAST)
        self.model = model
        self.model.train()

    def _load_initial_weights(self, model: nn.Module) -> bool:
        """Load --backbone-weights / --load-from; False when the model keeps its random init."""
        from oilleak.models.checkpoint import load_torchvision_resnet, load_weights

        if self.cfg.backbone_weights:
            self.note(f"backbone weights from {self.cfg.backbone_weights}")
            self.note(load_torchvision_resnet(model, self.cfg.backbone_weights).format())
        if self.cfg.load_from:
            self.note(f"weights from {self.cfg.load_from}")
            self.note(load_weights(model, self.cfg.load_from, classes=self.config.data.classes).format())
        if not (self.cfg.backbone_weights or self.cfg.load_from):
            self.note(NO_PRETRAINED_WARNING, markup=True)
            return False
        return True

    def _calibrate_batchnorm(self, model: nn.Module, max_batches: int = 10) -> int:
        """Frozen BatchNorm's statistics from the first training batches; returns how many were used."""
        self.batches.set_position(0)
        self.train_set.set_epoch(0, self.cfg.seed)
        batches = (batch.images.to(self.runtime.device) for _, batch in zip(range(max_batches), self.loader))
        return calibrate_frozen_batchnorm(model, batches)

    def _restore_train_state(self, state: dict[str, Any], path: Path, total_batch: int) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.iteration = state["epoch"], state["step_in_epoch"], state["iteration"]
        self.trained_s = state.get("trained_s", 0.0)
        self.best = state.get("best")
        same_shape = state["world_size"] == self.runtime.world_size and state["batch_size"] == self.config.data.batch_size
        if same_shape:
            restore_rng(state["rng"][self.runtime.rank])
        else:
            self.note(
                f"note: the run being resumed used {state['world_size']} process(es) x batch "
                f"{state['batch_size']}; now {self.runtime.world_size} x {self.config.data.batch_size} "
                f"(total batch {total_batch}): data order and random draws differ from an uninterrupted run"
            )
            seed_everything(self.cfg.seed + 1 + self.runtime.rank + self.iteration)
        if self.step_in_epoch > self.batches.steps_per_epoch:
            self.step_in_epoch = self.batches.steps_per_epoch
        self.note(
            f"resuming from {path}: epoch {self.epoch + 1}, step {self.step_in_epoch}/"
            f"{self.batches.steps_per_epoch} of it, iteration {self.iteration}"
            + (f", best {BEST_METRIC} {self.best:.4f}" if self.best is not None else "")
        )

    def _write_config(self, resume_path: Path | None) -> None:
        """``config.yaml``: the config of the run; a resume with a changed config adds
        ``config.resume-<iteration>.yaml`` beside it (the first run's file is kept)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / "config.yaml"
        if resume_path is not None and path.exists():
            if yaml.safe_load(path.read_text(encoding="utf-8")) == self.config.to_dict():
                return
            path = self.work_dir / f"config.resume-{self.iteration}.yaml"
            if path.exists():
                return
        save_config(self.config, path)

    # ------------------------------------------------------------------------------------------ loop

    @property
    def total_steps(self) -> int:
        """The steps this training will end at: --max-iters when it comes first."""
        steps = self.cfg.epochs * self.batches.steps_per_epoch
        return steps if self.options.max_iters is None else min(steps, self.options.max_iters)

    def run(self) -> TrainResult:
        stopped_by = None
        log = TrainLog(
            self.work_dir, enabled=self.runtime.is_main, console=self.console, device=self.runtime.device,
            total_steps=self.total_steps, start_step=self.iteration, log_interval=self.cfg.log_interval,
        )
        with log:
            self.log = log
            if self._reached_max_iters():
                stopped_by = "max-iters"  # a resumed run that is already there
            while self.epoch < self.cfg.epochs and stopped_by is None:
                stopped_by = self._run_epoch()
        if stopped_by in ("SIGINT", "SIGTERM"):
            self.note(
                f"stopped by {stopped_by} at iteration {self.iteration}; resumable checkpoint {self.files.latest}. "
                f"Continue with: oilleak train {self.options.config_name} --work-dir {self.work_dir} --resume"
            )
        elif stopped_by == "max-iters":
            self.note(f"stopped after --max-iters {self.options.max_iters}; latest checkpoint {self.files.latest}")
        elif stopped_by == "time":
            self.note(f"stopped after {self.trained_s:.0f} s of training (time budget {self.cfg.time_budget_s:g} s), "
                      f"{self.iteration} iterations; latest checkpoint {self.files.latest}")
        else:
            self.note(f"training finished: {self.iteration} iterations, checkpoints in {self.work_dir}")
        self.note(self._checkpoint_to_use())
        return TrainResult(self.work_dir, self.iteration, self.epoch, self.best, stopped_by, self.module)

    def _run_epoch(self) -> str | None:
        steps = self.batches.steps_per_epoch
        if self.step_in_epoch < steps:
            self.batches.set_position(self.epoch, self.step_in_epoch)
            self.train_set.set_epoch(self.epoch, self.cfg.seed)  # the epoch's random flips / scales
            data = iter(self.loader)
            while self.step_in_epoch < steps:
                outcome = self._step(data)
                if outcome == "time":
                    self._evaluate_at_stop(self.epoch + 1)
                if outcome is not None:
                    self._save_latest()
                    return outcome
                if self._reached_max_iters() and self.step_in_epoch < steps:
                    self._evaluate_at_stop(self.epoch + 1)
                    self._save_latest()
                    return "max-iters"
        saved = self._end_epoch()
        if self._reached_max_iters() and self.epoch < self.cfg.epochs:
            if not self._evaluates(self.epoch):
                self._evaluate_at_stop(self.epoch)
            if not saved:
                self._save_latest()
            return "max-iters"
        return None

    def _reached_max_iters(self) -> bool:
        return self.options.max_iters is not None and self.iteration >= self.options.max_iters

    def _step(self, data: Iterator) -> str | None:
        """One optimisation step; returns the stop signal's name when the ranks agreed to stop after it, or
        "time" when the time budget was spent before it."""
        start = time.perf_counter()
        try:
            batch = self._load(data)
            data_seconds = time.perf_counter() - start
            # over train.epochs, not --max-iters: a run stopped early keeps the lr of the full schedule
            progress = run_progress(self.iteration, self.cfg.epochs * self.batches.steps_per_epoch, self.trained_s, self.cfg)
            lr = lr_at(self.base_lr, self.iteration, self.epoch, self.cfg, progress)
            set_lr(self.optimizer, lr)
            total, values, stopping = self._forward(batch)
        except _StopBeforeStep as stop:  # nothing of this step was applied: the state is still the last boundary's
            return stop.reason
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        self.step_in_epoch += 1
        self.boundary_rng = capture_rng()
        seconds = time.perf_counter() - start
        self.trained_s += seconds
        self.log.step(step=self.iteration, epoch=self.epoch + 1, lr=lr, losses=values, seconds=seconds,
                      data_seconds=data_seconds, total_steps=self._expected_steps())
        return (self.signals.received or "SIGTERM") if stopping else None

    def _expected_steps(self) -> int:
        """The step this training will end at, for the progress bar: with a time budget, estimated from the
        mean step time so far."""
        if self.cfg.time_budget_s is None:
            return self.total_steps
        left = max(self.cfg.time_budget_s - self.trained_s, 0.0)
        return min(self.total_steps, self.iteration + math.ceil(left * self.iteration / max(self.trained_s, 1e-9)))

    def _load(self, data: Iterator) -> Batch:
        """The next batch, once every rank has one: DistributedDataParallel's forward starts with collectives
        of its own, which a rank whose loading failed would never join."""
        try:
            batch = next(data).to(self.runtime.device)
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks first
            self._agree(error=exc)
        if self._agree():
            raise _StopBeforeStep(self.signals.received or "SIGTERM")
        if self.cfg.time_budget_s is not None and self.trained_s >= self.cfg.time_budget_s:
            raise _StopBeforeStep("time")  # trained_s was just agreed: every rank stops here
        return batch

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float], bool]:
        """The total loss, every loss term's value, and whether a rank was asked to stop after this step."""
        diverged = None
        try:
            with torch.autocast(self.runtime.device.type, dtype=torch.float16, enabled=self.amp):
                losses = self.model(batch.images, batch.metas, batch.targets)
            values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
            bad = next((k for k, v in values.items() if "loss" in k and not math.isfinite(v)), None)
            if bad is not None:
                diverged = f"loss term '{bad}' is {values[bad]}"
        except FloatingPointError as exc:  # the model's own NaN guards (e.g. before deformable offsets)
            diverged, losses, values = f"the forward pass met NaN ({exc})", {}, {}
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks first
            self._agree(error=exc)
        stopping = self._agree(diverged=diverged)
        return total_loss(losses), values, stopping

    def _agree(self, *, error: BaseException | None = None, diverged: str | None = None) -> bool:
        """All ranks learn whether any failed, diverged or was asked to stop, and agree on the training time
        (one small all-reduce). Failures and divergence end every rank here; returns whether a stop was requested."""
        failed, any_diverged, stopping, trained_s = distributed.sum_across_ranks(
            [float(error is not None), float(diverged is not None), float(self.signals.received is not None),
             self.trained_s],
            self.runtime,
        )
        self.trained_s = trained_s / self.runtime.world_size
        if failed and stopping:
            raise _StopBeforeStep(self.signals.received or "SIGTERM")  # e.g. Ctrl-C also reached the loader workers
        if failed:
            self._fail_together(error)
        if any_diverged:
            self._diverge_together(diverged)
        return bool(stopping)

    def _fail_together(self, error: BaseException | None) -> None:
        reports = distributed.gather(None if error is None else f"{type(error).__name__}: {error}", self.runtime)
        if error is not None:
            raise _AgreedStop(error, echo=False)  # this rank's own failure: its message and traceback
        failed = ", ".join(f"rank {r} ({msg})" for r, msg in enumerate(reports) if msg)
        raise _AgreedStop(OilleakError(f"training stopped at iteration {self.iteration + 1}: {failed} failed"))

    def _diverge_together(self, diverged: str | None) -> None:
        reports = distributed.gather(diverged, self.runtime)
        where = "; ".join(
            (f"rank {r}: " if self.runtime.distributed else "") + msg for r, msg in enumerate(reports) if msg
        )
        raise _AgreedStop(self._diverged(f"training stopped at iteration {self.iteration + 1} "
                                         f"(epoch {self.epoch + 1}): {where}. Nothing from this step was applied or saved"))

    def _diverged(self, what: str) -> TrainingDiverged:
        last = self.files.latest if self.files.latest.is_file() else None
        return TrainingDiverged(f"{what}; {diverged_advice(last, self.work_dir)}")

    # ------------------------------------------------------------------------------------------ epoch end

    def _end_epoch(self) -> bool:
        """Evaluate and checkpoint the epoch just finished; True when it wrote a resumable checkpoint."""
        epoch = self.epoch + 1  # 1-based: the epoch just finished
        metrics = self._evaluate(epoch) if self._evaluates(epoch) else None
        score = None if metrics is None else metrics.get(BEST_METRIC)
        improved = score is not None and math.isfinite(score) and (self.best is None or score > self.best)
        if improved:
            self.best = score
        self.epoch, self.step_in_epoch = epoch, 0
        self.boundary_rng = capture_rng()
        saves_epoch = epoch % self.cfg.checkpoint_interval == 0 or epoch == self.cfg.epochs
        if not (saves_epoch or improved):
            return False
        state = self._train_state()
        if self.runtime.is_main:
            if saves_epoch:
                path = self.files.save_epoch(epoch, model=self.module, config=self.config, train_state=state,
                                             is_best=improved)
            else:
                path = self.files.save_best(model=self.module, config=self.config, train_state=state)
            self.note(f"checkpoint {path}" + (f" (best {BEST_METRIC} so far: {score:.4f})" if improved else ""))
        distributed.barrier(self.runtime)
        return saves_epoch

    def _checkpoint_to_use(self) -> str:
        """Which file `oilleak test` and `predict` should take, and why when it is not best.pth."""
        if self.files.best.is_file():
            return f"checkpoint to test and predict with: {self.files.best} (best validation {BEST_METRIC})"
        if self.val_set is None:
            why = "no validation split, so no best.pth"
        elif self.best is None and self._evaluated:
            why = f"no best.pth: the validation gave no {BEST_METRIC} (no ground truth in the val split?)"
        else:
            why = "no best.pth: stopped before any evaluation"
        return f"checkpoint to test and predict with: {self.files.latest} ({why})"

    def _evaluate_at_stop(self, epoch: int) -> None:
        """A run that --max-iters stops between evaluations is evaluated where it stops, so that even a run
        shorter than an epoch leaves a best.pth to test and predict with (when the val split has images)."""
        if self.val_set is None or self._evaluated_at == self.iteration:
            return
        score = (self._evaluate(epoch) or {}).get(BEST_METRIC)
        if score is None or not math.isfinite(score) or (self.best is not None and score <= self.best):
            return
        self.best = score
        state = self._train_state()
        if self.runtime.is_main:
            path = self.files.save_best(model=self.module, config=self.config, train_state=state)
            self.note(f"checkpoint {path} (best {BEST_METRIC} so far: {score:.4f})")
        distributed.barrier(self.runtime)

    def _evaluates(self, epoch: int) -> bool:
        return self.val_set is not None and (epoch % self.cfg.eval_interval == 0 or epoch == self.cfg.epochs)

    def _evaluate(self, epoch: int) -> dict[str, float] | None:
        """Rank 0 evaluates the bare model on the validation split; the others wait for its metrics.
        ``epoch``: the (1-based) epoch the log files the metrics under."""
        self._evaluated, self._evaluated_at = True, self.iteration
        failure: BaseException | None = None
        outcome: tuple[dict[str, float] | None, str | None] = (None, None)
        if self.runtime.is_main:
            from oilleak.evaluate.coco_eval import evaluate_model
            from oilleak.evaluate.report import result_table

            try:
                with self.log.paused():  # the evaluation shows its own progress bar
                    result = evaluate_model(self.module, self.val_set, device=self.runtime.device,
                                            workers=self.config.data.workers, console=self.console)
                outcome = (dict(result.metrics), None)
                self.log.evaluation(epoch=epoch, step=self.iteration, metrics=outcome[0], table=result_table(result))
            except FloatingPointError as exc:  # NaN weights: do not save them
                failure = self._diverged(f"training stopped at iteration {self.iteration}: evaluating it met NaN ({exc})")
                outcome = (None, str(failure))
            except Exception as exc:  # noqa: BLE001 - tell the waiting ranks before failing
                failure, outcome = exc, (None, f"{type(exc).__name__}: {exc}")
            finally:
                self.model.train()
        metrics, error = distributed.from_main(outcome, self.runtime)
        if failure is not None:
            raise _AgreedStop(failure, echo=False)
        if error is not None:
            raise _AgreedStop(OilleakError(f"training stopped: the evaluation on rank 0 failed: {error}"))
        return metrics

    # ------------------------------------------------------------------------------------------ state

    def _train_state(self) -> dict[str, Any]:
        """The resumable state at the current step boundary (collective: every rank calls it)."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "iteration": self.iteration,
            "trained_s": self.trained_s,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp else None,
            "rng": distributed.gather(self.boundary_rng, self.runtime),
            "best": self.best,
            "best_metric": BEST_METRIC,
            "world_size": self.runtime.world_size,
            "batch_size": self.config.data.batch_size,
            "base_lr": self.base_lr,
        }

    def _save_latest(self) -> None:
        state = self._train_state()
        if self.runtime.is_main:
            self.files.save_latest(model=self.module, config=self.config, train_state=state)
        distributed.barrier(self.runtime)
