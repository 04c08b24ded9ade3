"""``oilleak train``: one process (CPU or one GPU) or many (``torchrun``), mmdetection's 1x schedule.

Each step the ranks agree twice (a three-number all-reduce each time), after loading the batch and after
the forward pass, on whether any rank failed, got a non-finite loss, or was asked to stop (Ctrl-C /
SIGTERM), before any gradient is exchanged. So an exception on one rank ends every rank with a message
instead of leaving the others waiting in a collective, a NaN never reaches the weights or a checkpoint,
and a stop request ends all ranks at the same step boundary with a resumable ``latest.pth``. Failures
outside those two points (an out-of-memory error in backward, say) end the job through torchrun, which
stops the other ranks when one exits.

Building the run is in ``build.py``, resuming in ``resume.py``, the checkpoint files in ``state.py``.
"""

from __future__ import annotations

import errno
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console

from oilleak import distributed
from oilleak.config import Config
from oilleak.distributed import Runtime
from oilleak.errors import OilleakError
from oilleak.models.detector import total_loss
from oilleak.structures import Batch
from oilleak.train.build import build_data, build_model
from oilleak.train.from_scratch import resolve_model_norm
from oilleak.train.log import TrainLog
from oilleak.train.options import TrainOptions, TrainResult, resolve_options
from oilleak.train.resume import (
    TORCHRUN_RUN_ID,
    check_optimizer_fits,
    load_resume_checkpoint,
    restore_rng_of_rank,
    resume_path,
    torchrun_restart,
    write_config,
)
from oilleak.train.schedule import build_optimizer, choose_lr, lr_at, run_progress, set_lr
from oilleak.train.state import CheckpointFiles, CheckpointWriteFailed, capture_rng, seed_everything
from oilleak.train.stop_signals import StopSignals
from oilleak.train.stops import AgreedStop, StopBeforeStep, TrainingDiverged, diverged_advice

__all__ = ["TrainOptions", "TrainResult", "TrainingDiverged", "Trainer", "run_training"]

BEST_METRIC = "segm_mAP"


def run_training(config: Config, options: TrainOptions, console: Console | None = None) -> TrainResult:
    runtime = distributed.start(options.device)
    console = console or Console()
    try:
        with StopSignals() as signals:
            result = Trainer(config, options, runtime, console, signals).run()
    except AgreedStop as stop:
        distributed.stop(runtime)
        if stop.echo and not runtime.is_main:
            raise SystemExit(2) from None
        raise stop.error from None
    except OSError as exc:  # the log, the plot: checkpoints report their own (CheckpointWriteFailed)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        work_dir = options.work_dir or config.train.work_dir
        raise OilleakError(
            f"{exc.filename or work_dir}: {exc.strerror} while training; the checkpoints already in {work_dir} are "
            "intact (they are written atomically). Free space there, then continue with --resume"
        ) from None
    distributed.stop(runtime)
    return result


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

        resumed_from = resume_path(self.work_dir, options)
        if resumed_from is not None and not (options.resume or options.resume_from):
            self.note(f"restarted by torchrun (restart {torchrun_restart()}): this job continues from {resumed_from}")
        distributed.barrier(runtime)  # every rank has looked at the work dir before rank 0 writes into it
        data = build_data(config, runtime, options.config_name, self.note)
        self.train_set, self.val_set, self.batches, self.loader = data.train_set, data.val_set, data.batches, data.loader
        checkpoint = load_resume_checkpoint(resumed_from) if resumed_from else None
        # the norm chosen, not "auto", goes into config.yaml and the checkpoints: they rebuild this model
        config.model.norm = resolve_model_norm(config, checkpoint)
        self.module, self.model = build_model(config, checkpoint, resumed_from, data, runtime, self.note)  # bare, trained
        self.model.train()

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
            self._restore_train_state(checkpoint, resumed_from, total_batch)
        else:
            seed_everything(cfg.seed + 1 + runtime.rank)  # each rank's own stream for the RoI samplers
        self.boundary_rng = capture_rng()
        if runtime.is_main:
            if resumed_from is not None and (dead := self.files.remove_dead_writes()):
                self.note(f"removed the unfinished checkpoint write(s) of the interrupted run: {', '.join(dead)}")
            write_config(config, self.work_dir, resumed_from, self.iteration)

    def note(self, text: str, markup: bool = False) -> None:
        if self.runtime.is_main:
            self.console.print(text, highlight=False, markup=markup, soft_wrap=True)

    def _restore_train_state(self, checkpoint: dict[str, Any], path: Path, total_batch: int) -> None:
        state = checkpoint["train_state"]
        check_optimizer_fits(state["optimizer"], self.optimizer, path, checkpoint["config"], self.config)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step_in_epoch, self.iteration = state["epoch"], state["step_in_epoch"], state["iteration"]
        self.trained_s = state.get("trained_s", 0.0)
        self.best = state.get("best")
        shape_note = restore_rng_of_rank(state, self.runtime, self.config, total_batch)
        if shape_note:
            self.note(shape_note)
        if self.step_in_epoch > self.batches.steps_per_epoch:
            self.step_in_epoch = self.batches.steps_per_epoch
        self.note(
            f"resuming from {path}: epoch {self.epoch + 1}, step {self.step_in_epoch}/"
            f"{self.batches.steps_per_epoch} of it, iteration {self.iteration}"
            + (f", best {BEST_METRIC} {self.best:.4f}" if self.best is not None else "")
        )

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
        except StopBeforeStep as stop:  # nothing of this step was applied: the state is still the last boundary's
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
            raise StopBeforeStep(self.signals.received or "SIGTERM")
        if self.cfg.time_budget_s is not None and self.trained_s >= self.cfg.time_budget_s:
            raise StopBeforeStep("time")  # trained_s was just agreed: every rank stops here
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
            raise StopBeforeStep(self.signals.received or "SIGTERM")  # e.g. Ctrl-C also reached the loader workers
        if failed:
            self._fail_together(error)
        if any_diverged:
            self._diverge_together(diverged)
        return bool(stopping)

    def _fail_together(self, error: BaseException | None) -> None:
        reports = distributed.gather(None if error is None else f"{type(error).__name__}: {error}", self.runtime)
        if error is not None:
            raise AgreedStop(error, echo=False)  # this rank's own failure: its message and traceback
        failed = ", ".join(f"rank {r} ({msg})" for r, msg in enumerate(reports) if msg)
        raise AgreedStop(OilleakError(f"training stopped at iteration {self.iteration + 1}: {failed} failed"))

    def _diverge_together(self, diverged: str | None) -> None:
        reports = distributed.gather(diverged, self.runtime)
        where = "; ".join(
            (f"rank {r}: " if self.runtime.distributed else "") + msg for r, msg in enumerate(reports) if msg
        )
        raise AgreedStop(self._diverged(f"training stopped at iteration {self.iteration + 1} "
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
        if saves_epoch:
            self._save(lambda: self.files.save_epoch(epoch, model=self.module, config=self.config, train_state=state,
                                                     is_best=improved), best=improved)
        else:
            self._save(lambda: self.files.save_best(model=self.module, config=self.config, train_state=state), best=True)
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
        self._save(lambda: self.files.save_best(model=self.module, config=self.config, train_state=state), best=True)

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
            raise AgreedStop(failure, echo=False)
        if error is not None:
            raise AgreedStop(OilleakError(f"training stopped: the evaluation on rank 0 failed: {error}"))
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
            "torchrun_run_id": TORCHRUN_RUN_ID,  # a job torchrun restarts resumes only its own checkpoints
        }

    def _save_latest(self) -> None:
        state = self._train_state()
        # not announced: the closing message names it
        self._save(lambda: self.files.save_latest(model=self.module, config=self.config, train_state=state), announce=False)

    def _save(self, write: Callable[[], Path], *, announce: bool = True, best: bool = False) -> None:
        """Rank 0 writes a checkpoint while the others wait for it; a write that fails (a full disk) ends
        every rank, rank 0 with the message. ``best``: the checkpoint holds the best score so far."""
        failure: CheckpointWriteFailed | None = None
        if self.runtime.is_main:
            try:
                path = write()
            except CheckpointWriteFailed as exc:
                failure = exc
            else:
                if announce:
                    self.note(f"checkpoint {path}" + (f" (best {BEST_METRIC} so far: {self.best:.4f})" if best else ""))
        message = distributed.from_main(None if failure is None else str(failure), self.runtime)
        if message is not None:
            raise AgreedStop(failure or CheckpointWriteFailed(message))
