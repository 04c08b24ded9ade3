"""Resuming a training: which checkpoint to continue from, what of it to restore, and the run's config file.

A fresh training never writes into a work dir that holds another one; ``--resume`` continues from its
``latest.pth``, ``--resume-from`` from any checkpoint with a training state. A job that ``torchrun
--max-restarts`` restarts runs the same command again: it continues from the ``latest.pth`` its earlier
attempt wrote (the checkpoint records torchrun's run id), never from another training's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

from oilleak.config import Config, save_config
from oilleak.distributed import Runtime
from oilleak.errors import OilleakError
from oilleak.train.options import TrainOptions
from oilleak.train.state import existing_outputs, restore_rng, seed_everything


# The id torchrun gives every attempt of one job (TORCHELASTIC_RUN_ID); None outside torchrun.
TORCHRUN_RUN_ID = os.environ.get("TORCHELASTIC_RUN_ID")


def torchrun_restart() -> int:
    """How many times torchrun has restarted this job (0: its first attempt, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


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
    if (own := _own_latest_after_restart(work_dir)) is not None:
        return own
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


def _own_latest_after_restart(work_dir: Path) -> Path | None:
    latest = work_dir / "latest.pth"
    if torchrun_restart() == 0 or TORCHRUN_RUN_ID is None or not latest.is_file():
        return None
    from oilleak.models.checkpoint import read_checkpoint_file

    state = read_checkpoint_file(latest).get("train_state") or {}
    return latest if state.get("torchrun_run_id") == TORCHRUN_RUN_ID else None


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


def check_optimizer_fits(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: Path,
                         recorded: dict[str, Any], config: Config) -> None:
    """Refuse to resume an optimiser state that was kept for other tensors than this run trains (after, e.g.,
    ``--set train.backbone_norm=batch``, which unfreezes the stem), naming what changed in the config and the fix;
    ``Optimizer.load_state_dict`` would raise a bare ValueError, or a shape error at the first step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    problem = None
    if len(saved_ids) != len(params) or len(saved["param_groups"]) != len(optimizer.param_groups):
        problem = f"its optimiser state is for {len(saved_ids)} trained tensors, this run trains {len(params)}"
    else:
        for position, (index, param) in enumerate(zip(saved_ids, params)):
            buffer = saved["state"].get(index, {}).get("momentum_buffer")
            if buffer is not None and buffer.shape != param.shape:
                problem = (f"trained tensor {position} is {list(buffer.shape)} in its optimiser state, "
                           f"{list(param.shape)} in this run")
                break
    if problem is None:
        return
    changes = config_changes(recorded, config.to_dict())
    changed = "; ".join(changes[:6]) if changes else "nothing in the recorded config (an older oilleak wrote it?)"
    raise OilleakError(
        f"--resume from {path}: {problem}, so the training cannot continue from it. Changed since the checkpoint's "
        f"config: {changed}. Drop those --set options or config edits to resume, or start a new training from its "
        f"weights in another --work-dir with --load-from {path} (a fresh optimiser and schedule)"
    )


def config_changes(recorded: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old in the checkpoint, new now`` for every dotted key whose value differs."""
    changes = []
    for key in sorted(recorded.keys() | now.keys()):
        old, new = recorded.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += config_changes(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key}: {old} in the checkpoint, {new} now")
    return changes
