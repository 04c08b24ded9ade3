"""How a training ends early: the errors every rank raises together, and the advice after a NaN stop."""

from __future__ import annotations

from pathlib import Path

from oilleak.errors import OilleakError


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


class StopBeforeStep(Exception):
    """A stop was requested (a signal's name) or the time budget is spent ("time"), and this step cannot (or
    need not) run: save the state before it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class AgreedStop(Exception):
    """Every rank raises this at the same step, so the process group can be left cleanly. ``echo``: the
    error repeats what rank 0 reports, so ranks other than 0 end quietly (exit 2) instead of printing it."""

    def __init__(self, error: BaseException, echo: bool = True) -> None:
        self.error = error
        self.echo = echo
