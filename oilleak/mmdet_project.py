"""An mmdetection 3.x config file (``configs/.../my_project.py``) read as it is into an oilleak :class:`Config`.

mmengine's ``Config.fromfile`` reads the file, its ``_base_`` tree and its in-place edits exactly as mmdetection
does (the optional extra ``oilleak[mmdet]``); ``--cfg-options key=value`` merges into it with mmengine's own
parser. Then every key oilleak's workflow uses is mapped by name; what oilleak does not need is listed as
ignored with the reason, and what it cannot do is refused naming the key. :func:`describe` prints the table.

The model dict goes through :func:`oilleak.models.mmdet_config.spec_from_mmdet` and must be one of oilleak's
presets (DetectoRS-HTC-R50 or HTC-R50) at any class count.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from oilleak.config import Config, ConfigError, SplitConfig, config_from_dict
from oilleak.errors import OilleakError

INSTALL = "pip install 'oilleak[mmdet]' (mmengine 0.10, pure Python: it reads mmdetection's config files)"
# mmdetection's DetDataPreprocessor as oilleak's input contract fixes it (docs/design.md, Conventions)
PREPROCESSOR = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "bgr_to_rgb": True, "pad_size_divisor": 32}
# top-level keys that shape mmengine's runner, not the training oilleak runs
RUNNER_KEYS = {
    "default_scope": "oilleak has no registry scopes",
    "env_cfg": "oilleak sets up torch itself (cudnn benchmark off, spawn workers, NCCL/gloo under torchrun)",
    "log_processor": "oilleak logs log.jsonl, TensorBoard and loss_curve.png",
    "log_level": "oilleak logs every train.log_interval iterations",
    "vis_backends": "oilleak writes TensorBoard and loss_curve.png",
    "visualizer": "oilleak test --show-dir draws ground truth beside prediction",
    "launcher": "run under torchrun for several GPUs",
    "backend_args": "files are read from disk",
    "custom_hooks": "oilleak has no hooks",
    "val_cfg": "validation runs the val split every train.eval_interval epochs",
    "test_cfg": "oilleak test evaluates the test split",
    "dataset_type": "a variable of the base files; the datasets' own type is checked",
    "data_root": "a variable of the base files; each dataloader's data_root is read",
    "backend": "a variable of the base files",
    "classes": "a variable of the config; the dataloaders' metainfo.classes are read",
    "img_scale": "a variable of the base files; the pipelines are read",
    "train_pipeline": "a variable; train_dataloader.dataset.pipeline is read",
    "test_pipeline": "a variable; test_dataloader.dataset.pipeline is read",
}
DATALOADER_IGNORED = {
    "persistent_workers": "oilleak keeps workers for the run",
    "pin_memory": "oilleak pins memory on CUDA",
    "drop_last": "oilleak keeps every image",
    "collate_fn": "oilleak pads batches as mmdetection's DetDataPreprocessor does",
}


class MMDetConfigError(ConfigError):
    """An mmdetection config that oilleak cannot run as it is."""


@dataclass
class MappingReport:
    """What was taken from the user's file (mmdet key, value, oilleak key), what was ignored and why."""

    path: Path
    taken: list[tuple[str, str, str]] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def take(self, key: str, value: Any, oilleak_key: str) -> None:
        self.taken.append((key, _short(value), oilleak_key))

    def ignore(self, key: str, why: str) -> None:
        self.ignored.append((key, why))


@dataclass
class MMDetProject:
    """The oilleak config an mmdetection file amounts to, plus what the mmdet runner would do beyond it."""

    config: Config
    report: MappingReport
    resume: bool = False  # mmdet's resume=True: continue from work_dir's latest checkpoint
    auto_scale_lr: bool = False  # auto_scale_lr.enable (mmdet's --auto-scale-lr sets it)


def is_mmdet_config(path: str | Path) -> bool:
    return Path(path).suffix == ".py"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    """mmengine's ConfigDicts and tuples as plain dicts and lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_mmdet_file(path: str | Path, cfg_options: list[str] | None = None) -> dict[str, Any]:
    """The resolved config (``_base_`` tree, in-place edits, then ``--cfg-options``) as plain dicts."""
    try:
        from mmengine.config import Config as MMEngineConfig, DictAction
    except ImportError:
        raise MMDetConfigError(f"{path} is an mmdetection config; reading it needs mmengine: {INSTALL}") from None
    path = Path(path)
    if not path.is_file():
        raise MMDetConfigError(f"config file {path} does not exist")
    try:
        cfg = MMEngineConfig.fromfile(str(path))
    except Exception as exc:  # mmengine raises whatever the file's Python raises; say which file and why
        raise MMDetConfigError(f"mmengine could not read {path} (or a file in its _base_ tree): {type(exc).__name__}: {exc}") from None
    options = {}
    for text in cfg_options or []:
        if "=" not in text:
            raise MMDetConfigError(f"--cfg-options {text!r}: expected KEY=VALUE, e.g. --cfg-options train_dataloader.batch_size=1")
        key, raw = text.split("=", 1)
        options[key.strip()] = DictAction._parse_iterable(raw)  # mmengine's own value parser: lists, tuples, numbers
    if options:
        try:
            cfg.merge_from_dict(options)
        except Exception as exc:
            raise MMDetConfigError(f"--cfg-options {' '.join(cfg_options or [])}: {exc}") from None
    return _plain(cfg.to_dict())


class _Reader:
    """Walks the resolved mmdet dict; every value read is recorded, every refusal names the dotted key."""

    def __init__(self, cfg: dict[str, Any], report: MappingReport):
        self.cfg, self.report = cfg, report

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.cfg
        for part in dotted.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return default
        return node

    def refuse(self, dotted: str, why: str) -> MMDetConfigError:
        value = self.get(dotted)
        shown = f" = {_short(value)}" if value is not None else ""
        return MMDetConfigError(f"{self.report.path}: {dotted}{shown}: {why}")


# ------------------------------------------------------------------------------------------------ data


def _join(*parts: str) -> str:
    return posixpath.join(*[p for p in parts if p])


def _split(r: _Reader, loader: str, root: str) -> tuple[SplitConfig, list[str]]:
    """One dataloader's dataset -> (its split relative to ``root``, its classes)."""
    ds = f"{loader}.dataset"
    if r.get(ds) is None:
        raise r.refuse(loader, "has no dataset; oilleak reads CocoDataset dataloaders")
    kind = r.get(f"{ds}.type")
    if kind != "CocoDataset":
        raise r.refuse(f"{ds}.type", "oilleak reads COCO-format datasets only (CocoDataset); dataset wrappers such as "
                       "RepeatDataset or ConcatDataset are not supported: point the dataloader at one CocoDataset")
    classes = r.get(f"{ds}.metainfo.classes")
    if not classes:
        raise r.refuse(f"{ds}.metainfo", "names no classes, so mmdetection would train COCO's 80; set "
                       "metainfo=dict(classes=(...)) with your categories' names")
    own_root = r.get(f"{ds}.data_root") or ""
    prefix = r.get(f"{ds}.data_prefix") or {}
    for key in prefix:
        if key not in ("img", "seg"):
            r.report.ignore(f"{ds}.data_prefix.{key}", "oilleak reads images (img) and semantic maps (seg)")
    ann_file = r.get(f"{ds}.ann_file")
    if not ann_file:
        raise r.refuse(f"{ds}.ann_file", "is missing: name the COCO annotation json of this split")

    def rel(p: str) -> str:
        full = _join(own_root, p)  # mmdet joins data_root and each path; an absolute path stays as it is
        return posixpath.relpath(full, root) if root and not posixpath.isabs(p) and full.startswith(root) else full

    seg = prefix.get("seg")
    split = SplitConfig(ann_file=rel(ann_file), img_dir=rel(prefix.get("img", "")) or ".", sem_dir=rel(seg) if seg else None)
    for key, value, target in (("ann_file", ann_file, "ann_file"), ("data_prefix.img", prefix.get("img", ""), "img_dir"),
                               ("data_prefix.seg", seg, "sem_dir")):
        if value is not None:
            r.report.take(f"{ds}.{key}", value, f"{target}: {getattr(split, target)}")
    return split, list(classes)


def _semantic_note(root: str, split: SplitConfig, name: str, r: _Reader) -> None:
    if split.sem_dir is None:
        return
    folder = Path(root) / split.sem_dir
    if not folder.is_dir():
        r.report.ignore(f"{name} semantic maps", f"{folder} does not exist: oilleak derives the maps from the "
                        "instance masks (0 background, class k -> k + 1), where mmdetection would stop")


def _pipeline(r: _Reader, loader: str, train: bool, data: dict[str, Any]) -> None:
    key = f"{loader}.dataset.pipeline"
    steps = r.get(key) or []
    for i, step in enumerate(steps):
        kind, where = step.get("type"), f"{key}.{i}"
        if kind in ("LoadImageFromFile", "PackDetInputs"):
            continue
        if kind == "LoadAnnotations":
            if train and not (step.get("with_mask") and step.get("with_bbox", True)):
                raise r.refuse(where, "HTC trains on boxes and masks: set with_bbox=True, with_mask=True")
            continue
        if kind == "Resize":
            if not step.get("keep_ratio", False):
                raise r.refuse(f"{where}.keep_ratio", "oilleak resizes keeping the aspect ratio: set keep_ratio=True")
            scale = tuple(step["scale"]) if isinstance(step.get("scale"), (list, tuple)) else None
            if scale is None or len(scale) != 2:
                raise r.refuse(f"{where}.scale", "give (long edge, short edge), e.g. scale=(1333, 800)")
            data["train_scale" if train else "scale"] = [max(scale), min(scale)]
            r.report.take(f"{where}.scale", scale, "data.scale (training; data.multi_scale if not the test scale)" if train else "data.scale")
        elif kind == "RandomChoiceResize" and train:
            scales = [[max(s), min(s)] for s in step.get("scales", [])]
            if not step.get("keep_ratio", False) or not scales:
                raise r.refuse(where, "oilleak's multi-scale training draws one of scales=[...] keeping the ratio: set keep_ratio=True")
            data["multi_scale"] = scales
            r.report.take(f"{where}.scales", scales, "data.multi_scale")
        elif kind == "RandomFlip" and train:
            prob = step.get("prob", 0.5)
            if step.get("direction", "horizontal") != "horizontal" or isinstance(prob, (list, tuple)):
                raise r.refuse(where, "oilleak flips horizontally only: direction='horizontal' and one prob")
            data["flip_prob"] = float(prob)
            r.report.take(f"{where}.prob", prob, "data.flip_prob")
        elif kind == "PhotoMetricDistortion" and train:
            data["photometric"] = True
            r.report.take(where, kind, "data.photometric: true")
        else:
            raise r.refuse(f"{where}.type", "oilleak's pipelines have LoadImageFromFile, LoadAnnotations, Resize "
                           "(keep_ratio), RandomChoiceResize, RandomFlip, PhotoMetricDistortion and PackDetInputs; "
                           "remove this step")


def _data(r: _Reader) -> dict[str, Any]:
    root = r.get("train_dataloader.dataset.data_root") or ""
    train, classes = _split(r, "train_dataloader", root)
    data: dict[str, Any] = {"data_root": root or ".", "classes": classes, "train": train.model_dump()}
    r.report.take("train_dataloader.dataset.data_root", root, "data.data_root")
    r.report.take("train_dataloader.dataset.metainfo.classes", tuple(classes), f"data.classes ({len(classes)})")
    for loader, name in (("val_dataloader", "val"), ("test_dataloader", "test")):
        if r.get(f"{loader}.dataset") is None:
            continue
        split, split_classes = _split(r, loader, root)
        if split_classes != classes:
            raise r.refuse(f"{loader}.dataset.metainfo.classes", f"must be train_dataloader's {tuple(classes)}, in the same order")
        data[name] = split.model_dump()
        _semantic_note(root or ".", split, name, r)
    _semantic_note(root or ".", train, "train", r)
    _pipeline(r, "train_dataloader", True, data)
    test_loader = "test_dataloader" if r.get("test_dataloader.dataset") else "val_dataloader"
    _pipeline(r, test_loader, False, data)
    train_scale = data.pop("train_scale", None)
    if "scale" not in data:
        data["scale"] = train_scale or [1333, 800]
    elif train_scale and train_scale != data["scale"] and "multi_scale" not in data:
        data["multi_scale"] = [train_scale]  # oilleak's one scale serves test; training draws from multi_scale
    if r.get("train_dataloader.dataset.filter_cfg.filter_empty_gt", False):
        data["keep_negatives"] = False
        r.report.take("train_dataloader.dataset.filter_cfg.filter_empty_gt", True, "data.keep_negatives: false")
    if r.get("train_dataloader.dataset.filter_cfg.min_size") is not None:
        r.report.ignore("train_dataloader.dataset.filter_cfg.min_size", "oilleak keeps small images (it checks boxes instead)")
    for key, target in (("batch_size", "batch_size"), ("num_workers", "workers")):
        value = r.get(f"train_dataloader.{key}")
        if value is not None:
            data[target] = int(value)
            r.report.take(f"train_dataloader.{key}", value, f"data.{target}")
    batch_sampler = r.get("train_dataloader.batch_sampler.type")
    if batch_sampler not in (None, "AspectRatioBatchSampler"):
        raise r.refuse("train_dataloader.batch_sampler.type", "oilleak batches images of one orientation (AspectRatioBatchSampler) only")
    if r.get("train_dataloader.sampler.shuffle") is False:
        raise r.refuse("train_dataloader.sampler.shuffle", "oilleak shuffles the training images (a seeded, resumable order)")
    for key, why in DATALOADER_IGNORED.items():
        for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
            if r.get(f"{loader}.{key}") is not None:
                r.report.ignore(f"{loader}.{key}", why)
    for loader in ("val_dataloader", "test_dataloader"):
        if r.get(f"{loader}.batch_size") not in (None, 1):
            r.report.ignore(f"{loader}.batch_size", "oilleak evaluates one image per process at a time")
    return data


def _evaluators(r: _Reader, data: dict[str, Any]) -> None:
    for evaluator, split in (("val_evaluator", "val"), ("test_evaluator", "test")):
        ev = r.get(evaluator)
        if ev is None or split not in data:
            continue
        if isinstance(ev, list) or ev.get("type") != "CocoMetric":
            raise r.refuse(f"{evaluator}.type", "oilleak evaluates with COCO box and mask AP (CocoMetric) only")
        metrics = ev.get("metric", "bbox")
        metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        if any(m not in ("bbox", "segm") for m in metrics):
            raise r.refuse(f"{evaluator}.metric", "oilleak computes bbox and segm AP")
        r.report.take(f"{evaluator}.metric", metrics, "oilleak test (bbox and segm, always both)")
        ann = ev.get("ann_file")
        if ann:
            ours = posixpath.normpath(_join(data["data_root"], data[split]["ann_file"]))
            if posixpath.normpath(ann) != ours:
                raise r.refuse(f"{evaluator}.ann_file", f"is not the {split} dataset's annotations ({ours}); oilleak scores "
                               f"against the dataset's own: make them the same, e.g. --cfg-options {evaluator}.ann_file={ours}")
        for key in ev:
            if key not in ("type", "metric", "ann_file", "format_only", "backend_args"):
                r.report.ignore(f"{evaluator}.{key}", "oilleak always reports per-class AP, merged variants and the COCO size buckets")


# ------------------------------------------------------------------------------------------------ training


def _schedule(r: _Reader, train: dict[str, Any]) -> None:
    optim = r.get("optim_wrapper") or {}
    if optim.get("type", "OptimWrapper") not in ("OptimWrapper", "AmpOptimWrapper"):
        raise r.refuse("optim_wrapper.type", "oilleak runs OptimWrapper or AmpOptimWrapper (train.amp)")
    if optim.get("type") == "AmpOptimWrapper":
        train["amp"] = True
        r.report.take("optim_wrapper.type", "AmpOptimWrapper", "train.amp: true")
    opt = optim.get("optimizer") or {}
    if opt.get("type", "SGD") != "SGD":
        raise r.refuse("optim_wrapper.optimizer.type", "oilleak trains with SGD (mmdetection's recipe for this model)")
    for key in ("lr", "momentum", "weight_decay"):
        if key in opt:
            train[key] = float(opt[key])
            r.report.take(f"optim_wrapper.optimizer.{key}", opt[key], f"train.{key}")
    if optim.get("clip_grad"):
        train["grad_clip"] = float(optim["clip_grad"]["max_norm"])
        r.report.take("optim_wrapper.clip_grad.max_norm", optim["clip_grad"]["max_norm"], "train.grad_clip")
    if optim.get("paramwise_cfg"):
        raise r.refuse("optim_wrapper.paramwise_cfg", "oilleak applies one lr and weight decay to every parameter; remove it")
    schedulers = r.get("param_scheduler") or []
    schedulers = [schedulers] if isinstance(schedulers, dict) else schedulers
    train["warmup_iters"] = 0
    for i, s in enumerate(schedulers):
        where = f"param_scheduler.{i}"
        if s.get("type") == "LinearLR" and not s.get("by_epoch", True):
            train["warmup_iters"] = int(s.get("end", 0)) - int(s.get("begin", 0))
            train["warmup_ratio"] = float(s.get("start_factor", 1.0 / 3))
            r.report.take(where, f"LinearLR {s.get('start_factor')} over {train['warmup_iters']} iters", "train.warmup_ratio, warmup_iters")
        elif s.get("type") == "MultiStepLR" and s.get("by_epoch", True):
            train["milestones"], train["gamma"] = [int(m) for m in s["milestones"]], float(s.get("gamma", 0.1))
            train["lr_schedule"] = "step"
            r.report.take(where, f"MultiStepLR {s['milestones']} x{train['gamma']}", "train.milestones, gamma (lr_schedule: step)")
        elif s.get("type") == "CosineAnnealingLR" and s.get("by_epoch", True):
            train["lr_schedule"] = "cosine"
            r.report.take(where, "CosineAnnealingLR", "train.lr_schedule: cosine")
            if s.get("eta_min") is not None and train.get("lr"):
                train["min_lr_ratio"] = float(s["eta_min"]) / train["lr"]
        else:
            raise r.refuse(f"{where}.type", "oilleak's schedules are a LinearLR warm-up (by iteration) and MultiStepLR or "
                           "CosineAnnealingLR by epoch")
    loop = r.get("train_cfg") or {}
    if loop.get("type", "EpochBasedTrainLoop") != "EpochBasedTrainLoop":
        raise r.refuse("train_cfg.type", "oilleak trains by epochs (EpochBasedTrainLoop); give max_epochs")
    for key, target in (("max_epochs", "epochs"), ("val_interval", "eval_interval")):
        if key in loop:
            train[target] = int(loop[key])
            r.report.take(f"train_cfg.{key}", loop[key], f"train.{target}")
    train.setdefault("lr_schedule", "step")
    if train["lr_schedule"] == "step" and "milestones" not in train:
        train["milestones"], train["gamma"] = [], 1.0  # no MultiStepLR: a constant lr after the warm-up


def _runner(r: _Reader, train: dict[str, Any]) -> tuple[bool, bool]:
    hooks = r.get("default_hooks") or {}
    checkpoint = hooks.get("checkpoint") or {}
    if checkpoint.get("interval") is not None:
        if checkpoint.get("by_epoch", True) is False:
            raise r.refuse("default_hooks.checkpoint.by_epoch", "oilleak writes epoch checkpoints (and latest.pth every epoch)")
        train["checkpoint_interval"] = int(checkpoint["interval"])
        r.report.take("default_hooks.checkpoint.interval", checkpoint["interval"], "train.checkpoint_interval")
    if (checkpoint.get("max_keep_ckpts") or -1) > 0:
        train["keep_checkpoints"] = int(checkpoint["max_keep_ckpts"])
        r.report.take("default_hooks.checkpoint.max_keep_ckpts", checkpoint["max_keep_ckpts"], "train.keep_checkpoints")
    if (hooks.get("logger") or {}).get("interval") is not None:
        train["log_interval"] = int(hooks["logger"]["interval"])
        r.report.take("default_hooks.logger.interval", hooks["logger"]["interval"], "train.log_interval")
    for name in hooks:
        if name not in ("checkpoint", "logger"):
            r.report.ignore(f"default_hooks.{name}", "oilleak's trainer does this itself (timing, schedule, seeds, --show-dir)")
    auto = r.get("auto_scale_lr") or {}
    if auto.get("base_batch_size") is not None:
        train["base_batch_size"] = int(auto["base_batch_size"])
        r.report.take("auto_scale_lr.base_batch_size", auto["base_batch_size"], "train.base_batch_size")
    seed = r.get("randomness.seed")
    if seed is not None:
        train["seed"] = int(seed)
        r.report.take("randomness.seed", seed, "train.seed")
    if r.get("load_from"):
        train["load_from"] = str(r.get("load_from"))
        r.report.take("load_from", r.get("load_from"), "train.load_from")
    work_dir = r.get("work_dir") or str(Path("work_dirs") / r.report.path.stem)  # mmdetection's default
    train["work_dir"] = work_dir
    r.report.take("work_dir", work_dir, "train.work_dir")
    resume = bool(r.get("resume", False))
    if resume:
        r.report.take("resume", True, "--resume")
    return resume, bool(auto.get("enable", False))


# ------------------------------------------------------------------------------------------------ model


def _model(r: _Reader, num_classes: int) -> dict[str, Any]:
    from oilleak.models.mmdet_config import spec_from_mmdet
    from oilleak.models.presets import PRESETS
    from oilleak.models.specs import InferenceSpec

    model = r.get("model")
    if not isinstance(model, dict):
        raise MMDetConfigError(f"{r.report.path}: has no model=dict(...)")
    model = _plain(model)
    pre = model.pop("data_preprocessor", None) or {}
    for key, value in PREPROCESSOR.items():
        if key in pre and _plain(pre[key]) != value:
            raise r.refuse(f"model.data_preprocessor.{key}", f"oilleak's input is mmdetection's default, {key}={value}")
    roi = model.get("roi_head", {})
    for kind in ("bbox_head", "mask_head"):
        for i, head in enumerate(roi.get(kind, [])):
            if head.get("num_classes") != num_classes:
                r.report.ignore(f"model.roi_head.{kind}.{i}.num_classes", f"{head.get('num_classes')}: oilleak sizes every head "
                                f"from metainfo.classes ({num_classes})")
            head["num_classes"] = num_classes
    semantic = roi.get("semantic_head") or {}
    if semantic.get("num_classes") != num_classes + 1:
        r.report.ignore("model.roi_head.semantic_head.num_classes", f"{semantic.get('num_classes')}: oilleak's semantic maps hold "
                        f"background + {num_classes} classes, so the head has {num_classes + 1} outputs")
    semantic["num_classes"] = num_classes + 1
    for key in ("init_cfg", "pretrained"):
        for where, part in (("model.backbone", model.get("backbone", {})), ("model.neck.rfp_backbone", model.get("neck", {}).get("rfp_backbone") or {})):
            if part.pop(key, None) is not None:
                r.report.ignore(f"{where}.{key}", "oilleak downloads nothing: load_from gives the weights, or "
                                "--backbone-weights a local copy of torchvision's resnet50 .pth")
    try:
        spec = spec_from_mmdet(model)
    except OilleakError as exc:
        raise MMDetConfigError(f"{r.report.path}: {exc}") from None
    general = replace(spec, inference=InferenceSpec())
    for name in ("detectors_htc_r50", "htc_r50"):
        if general == PRESETS[name](num_classes):
            break
    else:
        raise r.refuse("model", "is neither mmdetection's detectors_htc-r50 nor htc-r50 (oilleak's presets); "
                       f"differences: {_differences(general, PRESETS['detectors_htc_r50'](num_classes))}")
    r.report.take("model", model.get("type"), f"model.preset: {name} (model.norm: batch, as norm_cfg BN)")
    inference = spec.inference
    r.report.take("model.test_cfg.rcnn", f"score_thr {inference.score_thr}, nms {inference.nms_iou}, max {inference.max_per_img}",
                  "model.score_thr, nms_iou, max_per_img, mask_thr")
    return {"preset": name, "norm": "batch", "mask_merge": "last", "score_thr": inference.score_thr,
            "nms_iou": inference.nms_iou, "max_per_img": inference.max_per_img, "mask_thr": inference.mask_thr}


def _differences(ours: Any, preset: Any, prefix: str = "") -> str:
    if is_dataclass(ours) and is_dataclass(preset) and type(ours) is type(preset):
        found = [_differences(getattr(ours, f.name), getattr(preset, f.name), f"{prefix}{f.name}.") for f in fields(ours)]
        return "; ".join(d for d in found if d)
    return "" if ours == preset else f"{prefix.rstrip('.')} {ours!r} (preset: {preset!r})"


# ------------------------------------------------------------------------------------------------ the whole file


def project_from_dict(cfg: dict[str, Any], path: str | Path, overrides: list[str] | None = None) -> MMDetProject:
    report = MappingReport(Path(path))
    r = _Reader(cfg, report)
    data = _data(r)
    _evaluators(r, data)
    train: dict[str, Any] = {}
    _schedule(r, train)
    resume, auto_scale_lr = _runner(r, train)
    model = _model(r, len(data["classes"]))
    known = {"model", "train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator", "test_evaluator",
             "optim_wrapper", "param_scheduler", "train_cfg", "default_hooks", "auto_scale_lr", "randomness",
             "load_from", "work_dir", "resume"}
    for key in cfg:
        if key in RUNNER_KEYS:
            report.ignore(key, RUNNER_KEYS[key])
        elif key not in known:
            report.ignore(key, "not a key oilleak's workflow uses")
    raw = {"data": data, "model": model, "train": train}
    config = config_from_dict(raw, f"{path} (read as an mmdetection config)", overrides)
    return MMDetProject(config=config, report=report, resume=resume, auto_scale_lr=auto_scale_lr)


def read_mmdet_project(path: str | Path, cfg_options: list[str] | None = None, overrides: list[str] | None = None) -> MMDetProject:
    """An mmdetection config file (with mmdetection's ``--cfg-options``, then oilleak's ``--set``) as oilleak's."""
    return project_from_dict(read_mmdet_file(path, cfg_options), path, overrides)


def describe(project: MMDetProject):
    """The table printed before a run: what oilleak took from the file, then what it ignored and why."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    taken = Table(title=f"taken from {escape(str(project.report.path))}", title_justify="left")
    for name in ("mmdetection key", "value", "oilleak"):
        taken.add_column(name, overflow="fold")
    for key, value, target in project.report.taken:
        taken.add_row(escape(key), escape(value), escape(target))
    ignored = Table(title="ignored", title_justify="left")
    ignored.add_column("mmdetection key", overflow="fold")
    ignored.add_column("why", overflow="fold")
    for key, why in project.report.ignored:
        ignored.add_row(escape(key), escape(why))
    return Group(taken, ignored) if project.report.ignored else taken
