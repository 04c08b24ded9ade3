"""Typed configuration: pydantic models loaded from YAML, with ``--set a.b=value`` overrides.

Every section forbids unknown keys, and every error names the file, the dotted key and the fix
(for a misspelt key: the closest valid one). Relative paths are taken relative to the current
working directory, as mmdetection does.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from oilleak.errors import OilleakError

PRESETS = ("detectors_htc_r50", "htc_r50", "detectors_htc_r50_tiny", "htc_r50_tiny")


class ConfigError(OilleakError):
    """A config file or override that cannot be used."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Section):
    """Where one split lives, relative to ``data.data_root``."""

    ann_file: str
    img_dir: str
    # Semantic maps for HTC's semantic branch. When the folder does not exist they are derived
    # from the instance masks (0 background, class k -> k + 1, 255 ignored).
    sem_dir: str | None = None


class DataConfig(_Section):
    data_root: str
    classes: list[str] = Field(min_length=1)
    train: SplitConfig = SplitConfig(ann_file="annotations/train.json", img_dir="train", sem_dir="train_mask")
    val: SplitConfig = SplitConfig(ann_file="annotations/val.json", img_dir="val", sem_dir="val_mask")
    # A third split for `oilleak test` only (an mmdetection config's test_dataloader); none by default.
    test: SplitConfig | None = None
    # (long edge, short edge) the image is resized to fit, keeping its aspect ratio.
    scale: tuple[int, int] = (1333, 800)
    # Training only: when given, each image draws one of these scales at random instead of `scale`.
    multi_scale: list[tuple[int, int]] = []
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    # Training only: mmdetection's PhotoMetricDistortion (brightness, contrast, saturation, hue).
    photometric: bool = False
    batch_size: int = Field(2, ge=1, description="images per GPU (or per process)")
    workers: int = Field(2, ge=0)
    # Images without annotations are valuable negatives for inspection data; mmdetection drops them.
    keep_negatives: bool = True

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, v: list[str]) -> list[str]:
        dupes = sorted({c for c in v if v.count(c) > 1})
        if dupes:
            raise ValueError(f"class names must be unique; repeated: {dupes}")
        return v

    def split(self, name: str) -> SplitConfig:
        if name == "test" and self.test is None:
            raise ConfigError("the config has no data.test split; use 'val', or add data.test (ann_file, img_dir)")
        if name not in ("train", "val", "test"):
            raise ConfigError(f"unknown split {name!r}; use 'train', 'val' or 'test'")
        return getattr(self, name)

    def root(self) -> Path:
        return Path(self.data_root)


class ModelConfig(_Section):
    preset: Literal[PRESETS] = "detectors_htc_r50"  # type: ignore[valid-type]
    # The normalisation layers: "batch" is mmdetection's (BatchNorm in both ResNets, none in the heads; every
    # mmdetection DetectoRS / HTC checkpoint); "group" is GroupNorm with 32 groups in both ResNets and after the
    # HTC mask and semantic heads' convs, as mmdetection's GN configs. "auto": GroupNorm for a training from
    # random weights, where frozen BatchNorm blew up on BSData and GroupNorm did not (BENCHMARKS.md, "Quality
    # on real photos"); BatchNorm otherwise, as the weights there are to load. A training records the norm it
    # chose in config.yaml and its checkpoints, so test, predict, serve and export rebuild the same model.
    norm: Literal["auto", "batch", "group"] = "auto"
    # Test-time mask of the three cascade stages: the "last" stage only (mmdetection 3.3, whose checkpoints
    # and results oilleak reproduces) or the "mean" of their sigmoids (HTC paper, mmdet 2.x, the published
    # COCO numbers).
    mask_merge: Literal["last", "mean"] = "last"
    score_thr: float = Field(0.001, ge=0.0, le=1.0, description="test-time score threshold before NMS")
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    max_per_img: int = Field(100, ge=1)
    mask_thr: float = Field(0.5, gt=0.0, lt=1.0)

    def resolved_norm(self, random_weights: bool = False) -> Literal["batch", "group"]:
        """The norm the model is built with: ``norm``, or for "auto" GroupNorm when a training starts from
        ``random_weights`` and mmdetection's BatchNorm for everything else."""
        if self.norm != "auto":
            return self.norm
        return "group" if random_weights else "batch"


class TrainConfig(_Section):
    """mmdetection's 1x schedule unless changed."""

    epochs: int = Field(12, ge=1)
    lr: float = Field(0.02, gt=0.0, description="learning rate for a total batch of base_batch_size")
    base_batch_size: int = Field(16, ge=1)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = Field(500, ge=0)
    warmup_ratio: float = Field(0.001, gt=0.0, le=1.0)
    milestones: list[int] = [8, 11]
    gamma: float = 0.1
    grad_clip: float | None = Field(None, gt=0.0, description="max gradient L2 norm; null = no clipping")
    # "step": mmdetection's MultiStepLR (x gamma at each milestone epoch). "cosine": from lr down to
    # lr x min_lr_ratio along a half cosine over the whole run, as ultralytics' cos_lr: a short run ends at a
    # low lr instead of in the noise of a constant one. "auto": step with loaded weights (mmdetection's recipe),
    # cosine from random weights, where it won on BSData (BENCHMARKS.md, "Quality on real photos").
    lr_schedule: Literal["auto", "step", "cosine"] = "auto"
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0, description="cosine: the lr at the end, as a fraction of lr")
    # Stop after this many seconds of training steps (data loading included; evaluations and checkpoints not
    # counted), with an evaluation and a resumable checkpoint, as ultralytics' time=. The cosine schedule then
    # runs over the time (or over train.epochs when they end first).
    time_budget_s: float | None = Field(None, gt=0.0, description="seconds of training; null = train.epochs decide")
    # The backbones' BatchNorm: "frozen" is mmdetection's recipe (running statistics fixed, stem and stage 1
    # frozen), built for ImageNet-initialised weights; "batch" trains every BatchNorm on batch statistics and
    # unfreezes the stem, which is what lets a detector learn from random weights (docs/design.md). "auto":
    # "frozen" when --load-from / --backbone-weights give weights, "batch" when training from scratch.
    # Default "frozen": "batch" failed the synthetic-shapes learning test (mask mAP 0.03 against 0.94).
    backbone_norm: Literal["auto", "frozen", "batch"] = "frozen"
    amp: bool = False
    checkpoint_interval: int = Field(1, ge=1, description="epochs between checkpoints")
    keep_checkpoints: int = Field(3, ge=1, description="epoch checkpoints kept besides latest and best")
    eval_interval: int = Field(1, ge=1)
    log_interval: int = Field(50, ge=1)
    seed: int = 0
    load_from: str | None = None
    backbone_weights: str | None = None
    work_dir: str = "work_dirs/oilleak"


class PredictConfig(_Section):
    score_thr: float = Field(0.3, ge=0.0, le=1.0)


class Config(_Section):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    predict: PredictConfig = PredictConfig()

    @model_validator(mode="after")
    def _check_milestones(self) -> Config:
        if any(m < 1 or m > self.train.epochs for m in self.train.milestones):
            raise ValueError(
                f"train.milestones {self.train.milestones} must lie within 1..train.epochs ({self.train.epochs})"
            )
        return self

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ----------------------------------------------------------------------------------------------
# loading


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a config can hold, e.g. ``train.lr`` and ``data.train.ann_file``."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, dotted + "."))
    return keys


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _valid_keys(Config), n=1, cutoff=0.5)
    if not close:
        # a misspelt leaf under a valid section: compare the leaf names only
        leaves = {k.rsplit(".", 1)[-1]: k for k in _valid_keys(Config)}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.6)]
    return f"; did you mean '{close[0]}'?" if close else ""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}'{_suggest(key)}")
        elif e["type"] == "missing":
            lines.append(f"  missing key '{key}': add it to the config")
        else:
            value = e.get("input")
            shown = f" (got {value!r})" if not isinstance(value, dict) else ""
            lines.append(f"  '{key}': {e['msg']}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=0.01`` -> (['train', 'lr'], 0.01); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=0.01")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key; expected KEY=VALUE, e.g. --set train.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc.problem})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    valid = set(_valid_keys(Config))
    for text in overrides:
        path, value = parse_override(text)
        dotted = ".".join(path)
        if dotted not in valid:
            raise ConfigError(f"--set {text!r}: unknown key '{dotted}'{_suggest(dotted)}")
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return raw


def _validate(raw: dict[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def config_from_dict(raw: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    config = _validate(raw, source)
    if not overrides:
        return config
    # Overrides apply to the complete config (defaults filled in), so `--set data.train.sem_dir=null`
    # changes one key of a section the file did not spell out instead of replacing the whole section.
    return _validate(apply_overrides(config.to_dict(), overrides), f"{source} with --set {' '.join(overrides)}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/oilleak.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping with 'data', 'model', 'train' sections")
    return config_from_dict(raw, str(path), overrides)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
