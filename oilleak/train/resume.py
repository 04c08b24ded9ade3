"""Resuming a training: which checkpoint to continue from, what of it to restore, and the run's config file.

A fresh training never writes into a work dir that holds another one; ``--resume`` continues from its
``latest.pth``, ``--resume-from`` from any checkpoint with a training state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from oilleak.config import Config, save_config
from oilleak.distributed import Runtime
from oilleak.errors import OilleakError
from oilleak.train.options import TrainOptions
from oilleak.train.state import existing_outputs, restore_rng, seed_everything


def resume_path(work_dir: Path, options: TrainOptions) -> Path | None:
    """The checkpoint to continue from (None: a fresh training), once the work dir is known to allow it."""
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


def load_resume_checkpoint(path: Path) -> dict[str, Any]:
    from oilleak.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    if "train_state" not in checkpoint:
        raise OilleakError(
            f"{path} holds weights but no training state, so it cannot be resumed; "
            f"start a new training from its weights with --load-from {path}"
        )
    return checkpoint


def restore_rng_of_rank(state: dict[str, Any], runtime: Runtime, config: Config, total_batch: int) -> str | None:
    """Continue this rank's random streams where the checkpoint left them; when the run's shape changed
    (processes or batch size) they cannot be, and the returned note says so."""
    if state["world_size"] == runtime.world_size and state["batch_size"] == config.data.batch_size:
        restore_rng(state["rng"][runtime.rank])
        return None
    seed_everything(config.train.seed + 1 + runtime.rank + state["iteration"])
    return (
        f"note: the run being resumed used {state['world_size']} process(es) x batch "
        f"{state['batch_size']}; now {runtime.world_size} x {config.data.batch_size} "
        f"(total batch {total_batch}): data order and random draws differ from an uninterrupted run"
    )


def write_config(config: Config, work_dir: Path, resume_path: Path | None, iteration: int) -> None:
    """``config.yaml``: the config of the run; a resume with a changed config adds
    ``config.resume-<iteration>.yaml`` beside it (the first run's file is kept)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "config.yaml"
    if resume_path is not None and path.exists():
        if yaml.safe_load(path.read_text(encoding="utf-8")) == config.to_dict():
            return
        path = work_dir / f"config.resume-{iteration}.yaml"
        if path.exists():
            return
    save_config(config, path)

