"""Checkpoints: oilleak's own format, and weight import from mmdetection and torchvision files.

An oilleak checkpoint is a ``torch.save``d dict that carries everything predict and serve need:

    {"format": "oilleak/1", "config": Config.to_dict(), "classes": [...], "state_dict": {...},
     "meta": {"oilleak": version, "torch": version, "created": ISO time}, ...extra (e.g. "train_state")}

It is written atomically (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written checkpoint under the final name.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

import oilleak
from oilleak.config import Config, ConfigError, config_from_dict
from oilleak.errors import OilleakError

FORMAT = "oilleak/1"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, *, model: nn.Module, config: Config, extra: dict[str, Any] | None = None) -> None:
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    ckpt = {
        "format": FORMAT,
        "config": config.to_dict(),
        "classes": list(config.data.classes),
        "state_dict": model.state_dict(),
        "meta": {
            "oilleak": oilleak.__version__,
            "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    ckpt.update(extra or {})
    atomic_torch_save(ckpt, path)


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load any checkpoint dict (oilleak, mmdet or a bare state dict) safely, with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise OilleakError(f"checkpoint {path} does not exist; pass the path of a .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise OilleakError(
            f"checkpoint {path} cannot be read ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "is it a complete PyTorch checkpoint file (not truncated, not a config)?"
        ) from None
    if not isinstance(obj, dict):
        raise OilleakError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an oilleak checkpoint (see the module docstring) and check its format."""
    ckpt = read_checkpoint_file(path)
    if ckpt.get("format") != FORMAT:
        hint = (
            " It looks like an mmdetection checkpoint: use it with `oilleak train --load-from` to fine-tune,"
            " or convert it into an oilleak checkpoint first."
            if "state_dict" in ckpt or "meta" in ckpt
            else ""
        )
        raise OilleakError(f"{path} is not an oilleak checkpoint (format {ckpt.get('format')!r}, expected {FORMAT!r}).{hint}")
    return ckpt


def config_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> Config:
    try:
        return config_from_dict(ckpt["config"], f"stored in {path}")
    except ConfigError as exc:
        raise OilleakError(f"{exc}\nThe checkpoint was written by oilleak {ckpt.get('meta', {}).get('oilleak')}.") from None


def model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Build the model an oilleak checkpoint describes, load its weights, return it in eval mode."""
    from oilleak.models.presets import build_model  # late import: presets builds on this module's users

    ckpt = load_checkpoint(path)
    config = config_from_checkpoint(ckpt, path)
    model = build_model(config.model, config.num_classes)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise OilleakError(
            f"checkpoint {path} does not match the model its config describes ({config.model.preset}): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model.to(device).eval(), config
