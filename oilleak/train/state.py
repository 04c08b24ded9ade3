"""What a resumable checkpoint holds besides the weights, and the checkpoint files of a work dir.

Work dir files (all written by rank 0, atomically):
  epoch_{N}.pth   after epoch N (1-based) every ``train.checkpoint_interval`` epochs; the last
                  ``train.keep_checkpoints`` are kept
  latest.pth      the newest resumable state: an epoch checkpoint, or a mid-epoch one written when
                  training stops early (Ctrl-C, SIGTERM, --max-iters)
  best.pth        the epoch with the highest validation ``segm_mAP``
The epoch, latest and best files of one moment share their bytes (hard links) where the file system
allows, so a checkpoint is written to disk once.

``train_state`` (stored in the oilleak checkpoint beside the weights): position (epoch, step, iteration),
optimiser and AMP scaler states, the RNG states of every rank, the best metric, and the run's shape
(world size, batch size, base lr) to warn when a resume changes it.
"""

from __future__ import annotations

import errno
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from oilleak.config import Config
from oilleak.errors import OilleakError
from oilleak.files import link_or_copy
from oilleak.models.checkpoint import save_checkpoint

# Files a training writes into its work dir; a fresh training refuses a work dir that holds any of them.
OUTPUT_NAMES = ("config.yaml", "log.jsonl", "latest.pth", "best.pth", "loss_curve.png", "tb")
EPOCH_FILE = re.compile(r"epoch_(\d+)\.pth")
# What oilleak.files.atomic_write names a checkpoint while writing it; one left behind is a write that died
# (kill -9, power loss) before its rename.
CHECKPOINT_TEMPORARY = re.compile(r"\.(latest|best|epoch_\d+)\.pth\.[0-9a-f]{12}\.tmp")


class CheckpointWriteFailed(OilleakError):
    """A checkpoint could not be written (a full disk, say); the files already there are untouched."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def existing_outputs(work_dir: Path) -> list[str]:
    if not work_dir.is_dir():
        return []
    names = [n for n in OUTPUT_NAMES if (work_dir / n).exists()]
    return names + sorted(p.name for p in work_dir.iterdir() if EPOCH_FILE.fullmatch(p.name))


class CheckpointFiles:
    """Writes and prunes the checkpoints of one work dir (rank 0 only)."""

    def __init__(self, work_dir: Path, *, keep: int) -> None:
        self.work_dir = work_dir
        self.keep = keep

    @property
    def latest(self) -> Path:
        return self.work_dir / "latest.pth"

    @property
    def best(self) -> Path:
        return self.work_dir / "best.pth"

    def save_epoch(self, epoch: int, *, model: nn.Module, config: Config, train_state: dict, is_best: bool) -> Path:
        path = self.work_dir / f"epoch_{epoch}.pth"

        def write() -> None:
            save_checkpoint(path, model=model, config=config, extra={"train_state": train_state})
            link_or_copy(path, self.latest)
            if is_best:
                link_or_copy(path, self.best)

        self._write(path, write)
        self._prune()
        return path

    def save_latest(self, *, model: nn.Module, config: Config, train_state: dict) -> Path:
        self._write(self.latest, lambda: save_checkpoint(self.latest, model=model, config=config,
                                                         extra={"train_state": train_state}))
        return self.latest

    def save_best(self, *, model: nn.Module, config: Config, train_state: dict) -> Path:
        self._write(self.best, lambda: save_checkpoint(self.best, model=model, config=config,
                                                       extra={"train_state": train_state}))
        return self.best

    def remove_dead_writes(self) -> list[str]:
        """Delete the temporary files of checkpoint writes that never finished (the process was killed in
        one); the names removed. Only for the training that owns the work dir, before it writes."""
        dead = sorted(p for p in self.work_dir.iterdir() if CHECKPOINT_TEMPORARY.fullmatch(p.name))
        for path in dead:
            path.unlink(missing_ok=True)
        return [p.name for p in dead]

    def _write(self, path: Path, write: Callable[[], None]) -> None:
        """Run ``write``; an OSError becomes a message with the free space, what is kept and the fix (the
        write left no file behind: atomic_write removes its temporary)."""
        try:
            write()
        except OSError as exc:
            free = shutil.disk_usage(self.work_dir).free / 2**20
            cause = exc.strerror or str(exc)
            fix = ("free space there" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                   else f"make {self.work_dir} writable")
            kept = (f"{self.latest} is intact" if self.latest.is_file()
                    else "no checkpoint was written before this one")
            raise CheckpointWriteFailed(
                f"could not write the checkpoint {path}: {cause} ({free:.0f} MB free in {self.work_dir}); {kept}. "
                f"Fix: {fix}, or move the work dir to a larger disk, then continue with --resume"
            ) from None

    def _prune(self) -> None:
        epochs = sorted(
            (int(m.group(1)), p) for p in self.work_dir.iterdir() if (m := EPOCH_FILE.fullmatch(p.name))
        )
        for _, path in epochs[: -self.keep]:
            path.unlink(missing_ok=True)
