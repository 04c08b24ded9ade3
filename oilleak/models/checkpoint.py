"""Checkpoints: oilleak's own format, and weight import from mmdetection and torchvision files.

An oilleak checkpoint is a ``torch.save``d dict that carries everything predict and serve need:

    {"format": "oilleak/1", "config": Config.to_dict(), "classes": [...], "state_dict": {...},
     "meta": {"oilleak": version, "torch": version, "created": ISO time}, ...extra (e.g. "train_state")}

It is written with :func:`oilleak.files.atomic_write`, so a crash never leaves a half-written checkpoint
under the final name.
"""

from __future__ import annotations

import datetime
import pickle
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import oilleak
from oilleak.config import Config, ConfigError, config_from_dict
from oilleak.errors import OilleakError
from oilleak.files import atomic_write
from oilleak.models.layers import ConvAWS2d
from oilleak.models.presets import build_model

FORMAT = "oilleak/1"


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
    with atomic_write(path) as f:
        writer = _WriteErrors(f)
        try:
            torch.save(ckpt, writer)
        except RuntimeError:
            if writer.error is not None:  # e.g. ENOSPC, which torch.save reports as "unexpected pos 704 vs 598"
                raise writer.error from None
            raise


class _WriteErrors:
    """A file for ``torch.save`` that keeps the OSError of a failed write (a full disk), which torch.save
    itself turns into a RuntimeError that names neither the file nor the cause."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.file.flush()


# torch.save writes a zip archive; files from before PyTorch 1.6 are a bare pickle (protocol 2+: 0x80).
TORCH_FILE_MAGICS = (b"PK\x03\x04", b"\x80")


def read_torch_file(path: str | Path, what: str = "checkpoint", expected: str = "a .pth file") -> Any:
    """``torch.load`` of a user-given file onto the CPU, tensors and containers only (weights_only), with
    errors that name the file: ``what`` it should be and the ``expected`` kind of path."""
    path = Path(path)
    if path.is_dir():
        raise OilleakError(f"{what} {path} is a directory; pass the path of {expected}")
    if not path.is_file():
        raise OilleakError(f"{what} {path} does not exist; pass the path of {expected}")
    with path.open("rb") as f:
        head = f.read(512)
    if not head.startswith(TORCH_FILE_MAGICS):
        kind = "it is empty" if not head else "it is a text file" if _is_text(head) else "it is no PyTorch file (neither a zip archive nor a pickle)"
        raise OilleakError(f"{path} is not a {what}: {kind}; pass the path of {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc):
            raise OilleakError(f"{what} {path} cannot be read ({str(exc).splitlines()[0][:200]}); is the file complete?") from None
        # never pass on torch's hint to load with weights_only=False: that runs whatever code the file holds
        raise OilleakError(
            f"{what} {path} holds Python objects other than tensors and plain containers (or is damaged); oilleak "
            f"loads only tensors, numbers, strings, lists and dicts, and will not unpickle anything else. Pass {expected}."
        ) from None
    except Exception as exc:  # noqa: BLE001 - damaged archives fail in many ways
        raise OilleakError(
            f"{what} {path} cannot be read ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "is it a complete PyTorch file (not truncated, not a config)?"
        ) from None


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


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


def build_with_weights(
    config: Config, state_dict: dict[str, Any], path: str | Path, recorded: Mapping[str, Any] | None = None
) -> nn.Module:
    """The model ``config`` describes with an oilleak checkpoint's weights: every tensor must fit.
    ``recorded``: the config stored in the checkpoint, to name what was changed when they do not."""
    model = build_model(config.model, config.num_classes)
    check_weights_fit(model, state_dict, path, config, recorded)
    model.load_state_dict(state_dict)
    return model


def check_weights_fit(
    model: nn.Module, state_dict: Mapping[str, Any], path: str | Path, config: Config,
    recorded: Mapping[str, Any] | None = None,
) -> None:
    """Refuse weights that do not fit ``model`` key for key and shape for shape, naming the first keys that
    differ and the model settings the checkpoint was trained with (``load_state_dict(strict=False)`` still
    raises a bare RuntimeError on a shape mismatch, e.g. after ``--set model.preset=`` of another width)."""
    check_norm(model, state_dict, str(path))
    own = model.state_dict()
    shapes = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if not (shapes or missing or unexpected):
        return
    found = []
    if shapes:
        found.append(f"{len(shapes)} tensors of another shape (" + "; ".join(
            f"{k}: {list(a)} in the checkpoint, {list(b)} in the model" for k, a, b in shapes[:3]) + ")")
    if missing:
        found.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
    if unexpected:
        found.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    raise OilleakError(
        f"checkpoint {path} does not fit the model.preset {config.model.preset} model for {config.num_classes} "
        f"classes: {', '.join(found)}. {_fit_fix(config, recorded)}"
    )


def _fit_fix(config: Config, recorded: Mapping[str, Any] | None) -> str:
    """How to build the model the weights were trained for: the preset the checkpoint records, when it is
    not the one asked for (the norm has its own message, from ``check_norm``; the other model settings are
    test-time ones that change no tensor)."""
    model = (recorded or {}).get("model")
    trained = model.get("preset") if isinstance(model, Mapping) else None
    if trained is None or trained == config.model.preset:
        return "Use the config the checkpoint was trained with (its model.preset and data.classes)"
    return (f"It was trained with model.preset={trained} (this run asks for model.preset={config.model.preset}): "
            f"drop that --set or config change, or pass --set model.preset={trained}")


def model_from_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None
) -> tuple[nn.Module, Config]:
    """Build the model an oilleak checkpoint describes, load its weights, return it in eval mode.
    ``overrides`` (``--set`` values) change the stored config first, e.g. ``model.mask_merge=last``."""
    ckpt = load_checkpoint(path)
    config = config_from_checkpoint(ckpt, path, overrides)
    if config.data.classes != ckpt["classes"]:
        raise OilleakError(f"--set cannot change data.classes of {path}: its weights are for {ckpt['classes']}")
    return build_with_weights(config, ckpt["state_dict"], path, ckpt["config"]).to(device).eval(), config


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
    reordered: str = ""  # how class rows were permuted into the model's class order, when they were

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
        if self.reordered:
            lines.append(self.reordered)
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


def load_weights(model: nn.Module, source: str | Path | Mapping[str, Any], classes: Sequence[str] | None = None) -> LoadReport:
    """Load every tensor of an oilleak checkpoint, an mmdet checkpoint or a bare state dict whose key and shape
    match ``model``; return what happened (nothing is loaded under another name or shape).

    ``source``: a file path or an already loaded dict. ``module.`` prefixes (DataParallel) are stripped.
    Class-dependent layers of another class count are skipped and keep their initial values, as are keys the
    file lacks (e.g. HTC's mask and semantic heads when loading a DetectoRS Cascade R-CNN checkpoint).
    ``classes``: the model's class names in its label order. An mmdetection checkpoint's label k is the k-th
    of its ``meta.dataset_meta.classes``; when those are the same names in another order, the class rows and
    channels are permuted into ``classes``' order (and the report says so), never loaded swapped.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<state dict>"
    obj = read_checkpoint_file(source) if isinstance(source, (str, Path)) else source
    state = _state_dict_of(obj, name)
    trained = mmdet_classes(obj)
    note = ""
    if classes is not None and trained is not None and trained != list(classes) and sorted(trained) == sorted(classes):
        state = reorder_classes(state, trained, list(classes))
        note = f"class rows and channels reordered from the checkpoint's order {trained} to {list(classes)}"
    report = _load_matching(model, state, name)
    report.reordered = note
    return report


def build_with_mmdet_weights(config: Config, checkpoint: Mapping[str, Any], path: str | Path) -> tuple[nn.Module, LoadReport]:
    """The model ``config`` describes with an mmdetection checkpoint's weights, class rows moved into
    ``config.data.classes``' order (:func:`load_weights`); refused when the file was trained on other classes or
    leaves a part of the model at its random initial values (its detections would mean nothing)."""
    trained = mmdet_classes(checkpoint)  # in mmdet's label order; the same names in another order get reordered
    if trained is not None and sorted(trained) != sorted(config.data.classes):
        raise OilleakError(
            f"mmdetection checkpoint {path} was trained on the classes {trained}, not {list(config.data.classes)} "
            "(data.classes); use the classes it was trained on (in any order)"
        )
    model = build_model(config.model, config.num_classes)
    report = load_weights(model, checkpoint, classes=config.data.classes)
    report.source = str(path)
    # missing or skipped tensors would keep random values; tensors the model has no place for (e.g. the RFP and
    # SAC of a DetectoRS file loaded as plain HTC) would be dropped: either way not the model that was trained
    if report.skipped or report.missing or report.unexplained()["unexpected"]:
        raise OilleakError(
            f"{report.format()}\ncheckpoint {path} is not a {config.model.preset} model for {config.num_classes} "
            "classes (the differences above); use the model.preset and data.classes it was trained with"
        )
    return model, report


def mmdet_classes(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """The class names of an mmdetection checkpoint in its label order (mmdet 3.x ``meta.dataset_meta.classes``,
    2.x ``meta.CLASSES``), or None when it does not say."""
    meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), Mapping) else {}
    classes = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES")
    return [str(c) for c in classes] if classes is not None else None


def reorder_classes(state: dict[str, torch.Tensor], trained: list[str], wanted: list[str]) -> dict[str, torch.Tensor]:
    """``state`` with every class-dependent row / channel moved from the order ``trained`` to ``wanted`` (the
    same names): the box classifiers (K + 1 rows, background last, stays last), class-specific box regressors
    (4 rows per class), the mask logits (K channels) and the semantic logits (K + 1 channels, background
    first: label k is channel k + 1). Layers of another size are left alone."""
    k = len(wanted)
    order = [trained.index(name) for name in wanted]  # new row i <- old row order[i]
    rows = {
        k + 1: order + [k],
        4 * k: [4 * c + j for c in order for j in range(4)],
        k: order,
    }
    semantic = [0] + [c + 1 for c in order]
    out = dict(state)
    for key, value in state.items():
        if re.search(r"semantic_head\.conv_logits\.(weight|bias)$", key) and value.shape[0] == k + 1:
            out[key] = value[semantic]
        elif re.search(r"bbox_head\.\d+\.fc_cls\.(weight|bias)$", key) and value.shape[0] == k + 1:
            out[key] = value[rows[k + 1]]
        elif re.search(r"bbox_head\.\d+\.fc_reg\.(weight|bias)$", key) and value.shape[0] == 4 * k and k > 1:
            out[key] = value[rows[4 * k]]
        elif re.search(r"mask_head\.\d+\.conv_logits\.(weight|bias)$", key) and value.shape[0] == k:
            out[key] = value[rows[k]]
    return out


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


def _norm_of(keys: Iterable[str]) -> str | None:
    """"batch" or "group": the norm of the ResNet stem in a state dict (mmdet's ``bn1`` / ``gn1``), or None."""
    for key in keys:
        if match := re.fullmatch(r"(?:backbone\.)?([bg]n)1\.weight", key):
            return "batch" if match.group(1) == "bn" else "group"
    return None


def check_norm(model: nn.Module, state: Mapping[str, Any], source: str) -> None:
    """Refuse, with the fix, weights whose ResNets have the other kind of norm than ``model``'s (BatchNorm
    vs GroupNorm): their norm tensors cannot load, and the network would run with initial norms."""
    found, built = _norm_of(state), _norm_of(model.state_dict())
    if found and built and found != built:
        raise OilleakError(
            f"{source} holds a {found.title()}Norm backbone but the model is built with model.norm: {built}; "
            f"set model.norm: {found} in the config (or --set model.norm={found}) to use these weights"
        )


def _load_matching(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, scope: tuple[str, ...] = ("",)
) -> LoadReport:
    """Copy the tensors of ``state`` whose key and shape match; report the rest. ``scope``: the key prefixes
    of the model that the file is meant to fill (missing keys are counted only there)."""
    check_norm(model, state, source)
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

    for name, module in model.named_modules():  # ConvAWS2d derived these while loading
        if isinstance(module, ConvAWS2d) and f"{name}.weight" in matching:
            buffers = {f"{name}.weight_gamma", f"{name}.weight_beta"}
            if not buffers & matching.keys():
                report.derived += sorted(buffers)
    derived = set(report.derived)
    report.missing = [k for k in own if k not in state and k not in derived and k.startswith(scope)]
    return report
