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
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import oilleak
from oilleak.config import Config, ConfigError, config_from_dict
from oilleak.errors import OilleakError
from oilleak.models.layers import ConvAWS2d
from oilleak.models.presets import build_model

FORMAT = "oilleak/1"


def umask_mode(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file the mode a plain ``open`` would (0666 less the umask, usually 0644):
    mkstemp makes it 0600, which the rename would keep."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask_mode(fd)
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
            "torch": str(torch.__version__),  # TorchVersion would not load with weights_only
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
    }
    ckpt.update(extra or {})
    atomic_torch_save(ckpt, path)


def read_torch_file(path: str | Path, what: str = "checkpoint", expected: str = "a .pth file") -> Any:
    """``torch.load`` of a user-given file onto the CPU, tensors and containers only (weights_only), with
    errors that name the file: ``what`` it should be and the ``expected`` kind of path."""
    path = Path(path)
    if not path.is_file():
        raise OilleakError(f"{what} {path} does not exist; pass the path of {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise OilleakError(
            f"{what} {path} cannot be read ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "is it a complete PyTorch file (not truncated, not a config)?"
        ) from None


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load any checkpoint dict (oilleak, mmdet or a bare state dict) safely, with clear errors."""
    obj = read_torch_file(path)
    if not isinstance(obj, dict):
        raise OilleakError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load an oilleak checkpoint (see the module docstring) and check its format."""
    ckpt = read_checkpoint_file(path)
    if ckpt.get("format") != FORMAT:
        hint = (
            f" It looks like an mmdetection checkpoint: start a training from it with `oilleak train --load-from {path}`;"
            " the checkpoints that training writes are oilleak checkpoints."
            if "state_dict" in ckpt or "meta" in ckpt
            else ""
        )
        raise OilleakError(f"{path} is not an oilleak checkpoint (format {ckpt.get('format')!r}, expected {FORMAT!r}).{hint}")
    return ckpt


def config_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>", overrides: list[str] | None = None) -> Config:
    try:
        return config_from_dict(ckpt["config"], f"stored in {path}", overrides)
    except ConfigError as exc:
        raise OilleakError(f"{exc}\nThe checkpoint was written by oilleak {ckpt.get('meta', {}).get('oilleak')}.") from None


def build_with_weights(config: Config, state_dict: dict[str, Any], path: str | Path) -> nn.Module:
    """The model ``config`` describes with an oilleak checkpoint's weights: every tensor must fit."""
    model = build_model(config.model, config.num_classes)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise OilleakError(
            f"checkpoint {path} does not fit the {config.model.preset} model for {config.num_classes} classes: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return model


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None
) -> tuple[nn.Module, Config]:
    """Build the model an oilleak checkpoint describes, load its weights, return it in eval mode.
    ``overrides`` (``--set`` values) change the stored config first, e.g. ``model.mask_merge=last``."""
    ckpt = load_checkpoint(path)
    config = config_from_checkpoint(ckpt, path, overrides)
    if config.data.classes != ckpt["classes"]:
        raise OilleakError(f"--set cannot change data.classes of {path}: its weights are for {ckpt['classes']}")
    return build_with_weights(config, ckpt["state_dict"], path).to(device).eval(), config


# ----------------------------------------------------------------------------------------------
# weight import: mmdetection checkpoints, bare state dicts, torchvision ImageNet ResNets

# Differences between a checkpoint and the model that are normal, with the reason shown in the report.
EXPECTED_DIFFERENCES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "class-dependent layer: its shape follows the number of classes, so it keeps its initial values",
        re.compile(r"(^|\.)(bbox_head\.\d+\.fc_cls|mask_head\.\d+\.conv_logits|semantic_head\.conv_logits)\.(weight|bias)$"),
    ),
    ("torchvision's ImageNet classifier, not part of a detector", re.compile(r"^fc\.(weight|bias)$")),
    (
        "DetectoRS part absent from ImageNet / plain ResNet weights; keeps its initial values",
        re.compile(r"\.conv2\.(weight_diff|(switch|pre_context|post_context|offset_s|offset_l)\.(weight|bias))$|\.rfp_conv\.(weight|bias)$"),
    ),
    (
        "HTC mask / semantic head, absent from (Cascade R-CNN) checkpoints without it; keeps its initial values",
        re.compile(r"^roi_head\.(mask_head|semantic_head)\."),
    ),
)


@dataclass
class LoadReport:
    """What loading a weight file did to each tensor of the model, for printing and checking.

    loaded: keys copied with an exact shape. skipped: (key, checkpoint shape, model shape) of keys whose shapes
    differ; the model keeps its value. missing: model keys the file lacks (kept initialised). unexpected: file
    keys the model lacks (ignored). derived: ConvAWS ``weight_gamma``/``weight_beta`` the file lacks, computed
    from the loaded weight so that the standardised conv equals it (as mmdet does for ImageNet weights).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)

    @staticmethod
    def reason(key: str) -> str | None:
        """Why a difference at ``key`` is expected (see EXPECTED_DIFFERENCES), or None."""
        return next((reason for reason, pattern in EXPECTED_DIFFERENCES if pattern.search(key)), None)

    def unexplained(self) -> dict[str, list[str]]:
        """The skipped / missing / unexpected keys that no expected difference explains."""
        groups = {"skipped": [k for k, _, _ in self.skipped], "missing": self.missing, "unexpected": self.unexpected}
        return {name: [k for k in keys if self.reason(k) is None] for name, keys in groups.items()}

    def format(self, max_lines: int = 20) -> str:
        lines = [
            f"weights from {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped)} skipped (shape "
            f"differs), {len(self.missing)} missing (kept initialised), {len(self.unexpected)} unexpected (ignored)"
            + (f", gamma/beta of {len(self.derived) // 2} ConvAWS convs derived from their weights" if self.derived else "")
        ]
        shapes = {k: f"checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.skipped}
        groups = {"skipped": list(shapes), "missing": self.missing, "unexpected": self.unexpected}
        for name, keys in groups.items():
            by_reason: dict[str, list[str]] = {}
            for key in keys:
                by_reason.setdefault(self.reason(key) or "", []).append(key)
            for reason, group in by_reason.items():
                if reason:  # expected: one summary line
                    examples = ", ".join(group[:2]) + (", ..." if len(group) > 2 else "")
                    lines.append(f"  {name} {len(group)} (expected: {reason}): {examples}")
                    continue
                for key in group[:max_lines]:
                    lines.append(f"  {name} {key}" + (f": {shapes[key]}" if key in shapes else "") + "  <- unexpected difference")
                if len(group) > max_lines:
                    lines.append(f"  ... and {len(group) - max_lines} more {name} keys")
        return "\n".join(lines)


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Any]) -> LoadReport:
    """Load every tensor of an oilleak checkpoint, an mmdet checkpoint or a bare state dict whose key and shape
    match ``model``; return what happened (nothing is loaded under another name or shape).

    ``source``: a file path or an already loaded dict. ``module.`` prefixes (DataParallel) are stripped.
    Class-dependent layers of another class count are skipped and keep their initial values, as are keys the
    file lacks (e.g. HTC's mask and semantic heads when loading a DetectoRS Cascade R-CNN checkpoint).
    """
    name = str(source) if isinstance(source, (str, Path)) else "<state dict>"
    obj = read_checkpoint_file(source) if isinstance(source, (str, Path)) else source
    state = _state_dict_of(obj, name)
    return _load_matching(model, state, name)


def load_torchvision_resnet(model: nn.Module, path: str | Path) -> LoadReport:
    """Load torchvision's ImageNet ResNet (``resnet50-*.pth``) into every ResNet of ``model``.

    ``model`` is a detector (its ``backbone.`` and, for DetectoRS, ``neck.rfp_modules.{k}.``) or a bare ResNet.
    ConvAWS gamma/beta are derived from the loaded weights and SAC extras / ``rfp_conv`` keep their identity
    init, so each ResNet computes exactly what torchvision's does. The report covers the ResNets only.
    """
    state = _state_dict_of(read_checkpoint_file(path), str(path))
    if "conv1.weight" not in state or "layer1.0.conv1.weight" not in state:
        raise OilleakError(
            f"{path} is not a torchvision ResNet state dict (no 'conv1.weight' / 'layer1.0.conv1.weight'); "
            "pass torchvision's ImageNet file such as resnet50-0676ba61.pth, or use load_weights for detector checkpoints"
        )
    own = model.state_dict()
    prefixes = [m.group(1) for k in own if (m := re.fullmatch(r"(backbone\.|neck\.rfp_modules\.\d+\.)conv1\.weight", k))]
    if not prefixes and "conv1.weight" in own:
        prefixes = [""]
    if not prefixes:
        raise OilleakError(f"the model has no ResNet (no 'backbone.conv1.weight') to load {path} into")
    classifier = {k: v for k, v in state.items() if k.startswith("fc.")}
    prefixed = {p + k: v for p in prefixes for k, v in state.items() if k not in classifier}
    report = _load_matching(model, prefixed, str(path), scope=tuple(prefixes))
    report.unexpected += list(classifier)
    return report


def _state_dict_of(obj: Mapping[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The weights inside an oilleak / mmdet checkpoint or a bare state dict, ``module.`` prefixes removed."""
    if isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # oilleak, or mmdet {'meta', 'state_dict', 'optimizer'?}
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise OilleakError(
            f"{name} holds no state dict: entries such as {not_tensors[:3]} are not tensors. Expected an oilleak "
            "checkpoint, an mmdetection checkpoint ({'state_dict': ...}) or a bare state dict"
        )
    state = {}
    for key, value in obj.items():
        while key.startswith("module."):
            key = key[len("module.") :]
        state[key] = value
    return state


def _load_matching(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, scope: tuple[str, ...] = ("",)
) -> LoadReport:
    """Copy the tensors of ``state`` whose key and shape match; report the rest. ``scope``: the key prefixes
    of the model that the file is meant to fill (missing keys are counted only there)."""
    own = model.state_dict()
    report = LoadReport(source)
    matching = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif value.shape != own[key].shape:
            report.skipped.append((key, tuple(value.shape), tuple(own[key].shape)))
        elif value.is_floating_point() != own[key].is_floating_point():
            raise OilleakError(f"{source}: '{key}' is {value.dtype} but the model holds {own[key].dtype} there")
        else:
            matching[key] = value
    result = model.load_state_dict(matching, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # every key was checked above
    report.loaded = list(matching)

    for name, module in model.named_modules():
        if isinstance(module, ConvAWS2d) and f"{name}.weight" in matching:
            buffers = {f"{name}.weight_gamma", f"{name}.weight_beta"}
            if not buffers & state.keys():
                module.match_gamma_beta_to_weight()
                report.derived += sorted(buffers)
    derived = set(report.derived)
    report.missing = [k for k in own if k not in state and k not in derived and k.startswith(scope)]
    return report
