"""`oilleak test CONFIG CKPT`: evaluate a checkpoint on a split of the config's data.

Writes, in a new folder ``WORK_DIR/test-YYYYmmdd-HHMMSS/``: metrics.json, per_class.csv, report.md,
pr_curves_{bbox,segm}.png and confusion_matrix.png. Optionally ``--out`` (all detections: COCO results
JSON, or mmdetection 3.3's result pickle: :mod:`oilleak.evaluate.mmdet_results`) and ``--show-dir`` (ground
truth beside prediction for every image). Existing files are never overwritten unless ``overwrite`` is set:
the check happens before the (long) evaluation starts.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from oilleak.config import Config
from oilleak import distributed
from oilleak.errors import OilleakError
from oilleak.models.inference_path import prepare_for_inference
from oilleak.evaluate.coco_eval import EvalResult, ImageResult, coco_evaluate, predict_dataset
from oilleak.evaluate.confusion import MATCH_IOU, confusion_matrix
from oilleak.evaluate.mmdet_results import SUFFIXES as MMDET_SUFFIXES, write_mmdet_results
from oilleak.evaluate.plots import plot_confusion_matrix, plot_pr_curves
from oilleak.evaluate.report import write_reports
from oilleak.files import atomic_write
from oilleak.paths import inside, is_within
from oilleak.progress import progress_bar
from oilleak.visualize import draw_instances, save_image, side_by_side

OUT_SUFFIXES = (".json", *MMDET_SUFFIXES)


@dataclass
class TestOutcome:
    result: EvalResult
    report_dir: Path
    written: list[Path] = field(default_factory=list)


# What `test` takes from an oilleak checkpoint rather than from the config: the model it holds and the
# scale it was trained at. The config gives the data; --set of these keys still wins.
FROM_CHECKPOINT = ("model", "data.scale")


def _from_checkpoint(config: Config, trained: Config, overrides: list[str]) -> tuple[Config, str]:
    """``config`` with the checkpoint's model and scale (``--set`` values of them applied on top), and a note
    saying what differs from the config file."""
    from oilleak.config import config_from_dict

    kept = [o for o in overrides if o.split("=", 1)[0].strip().startswith(("model.", "data.scale"))]
    raw = config.to_dict()
    raw["model"] = trained.to_dict()["model"]
    raw["data"]["scale"] = list(trained.data.scale)
    used = config_from_dict(raw, "the config with the checkpoint's model", kept)
    changed = [f"model.{k} {v} (the config says {getattr(config.model, k)})"
               for k, v in used.model.model_dump().items() if v != getattr(config.model, k)]
    if tuple(used.data.scale) != tuple(config.data.scale):
        changed.append(f"data.scale {list(used.data.scale)} (the config says {list(config.data.scale)})")
    note = ("from the checkpoint, as it was trained: " + "; ".join(changed)) if changed else ""
    return used, note


def load_model_for_test(ckpt: Path, config: Config, overrides: list[str] | None = None) -> tuple[nn.Module, str, Config]:
    """The checkpoint's model with its weights, a note on how they were loaded, and the config to test with.

    An oilleak checkpoint carries its model and the scale it was trained at: both are taken from it
    (``FROM_CHECKPOINT``; ``overrides``, the ``--set`` values, still win), the config gives the data, and
    its classes must be the checkpoint's (same names, same order). An mmdetection checkpoint is built as
    the config describes and loaded tensor by tensor with a report (``load_weights``).
    """
    from oilleak.models.checkpoint import (
        FORMAT, build_with_mmdet_weights, build_with_weights, config_from_checkpoint, read_checkpoint_file,
    )

    raw = read_checkpoint_file(ckpt)
    if raw.get("format") != FORMAT:
        model, report = build_with_mmdet_weights(config, raw, ckpt)
        return model, report.format(), config
    classes = list(raw.get("classes", []))
    if classes != list(config.data.classes):
        raise OilleakError(
            f"checkpoint {ckpt} was trained on the classes {classes}, but the config's data.classes are "
            f"{list(config.data.classes)}; evaluate it with the config it was trained with (same names, same order)"
        )
    used, note = _from_checkpoint(config, config_from_checkpoint(raw, ckpt), overrides or [])
    return build_with_weights(used, raw["state_dict"], ckpt, raw.get("config")), note, used


def check_out_path(out: Path | None, overwrite: bool, inputs: tuple[Path, ...] = ()) -> None:
    """``inputs``: files the run reads (checkpoint, annotation files), never replaced, ``overwrite`` or not."""
    if out is None:
        return
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise OilleakError(f"--out {out}: use a .json (COCO results), .pkl or .pickle (mmdetection 3.3's result "
                          "pickle, as its tools/test.py --out writes) file name")
    read = [p for p in inputs if p.exists() and p.resolve() == out.resolve()]
    if read:
        raise OilleakError(f"--out {out} is {read[0]}, a file this test reads; oilleak never replaces its inputs, "
                           "--overwrite included: choose another name")
    if out.exists() and not overwrite:
        raise OilleakError(f"--out {out} already exists; choose another name or add --overwrite to replace it")


def show_paths(show_dir: Path, images: list[tuple[int, str]]) -> dict[int, Path]:
    """Where each image's picture goes: under show_dir, at its dataset file name (sub-folders kept; names
    stay unique because the dataset's are), with ``.png`` added to names PIL cannot write by suffix.
    A name that would land outside show_dir (an absolute or ``..`` name, a symbolic link) is refused."""

    def picture(file_name: str) -> Path:
        path = Path(file_name)
        return path if path.suffix.lower() in (".jpg", ".jpeg", ".png") else path.with_name(path.name + ".png")

    fix = "give the image a file_name inside its image folder (`oilleak check` lists such names), or another --show-dir"
    return {image_id: inside(show_dir, picture(name), f"--show-dir picture of {name!r}", fix) for image_id, name in images}


def _check_show_dir(paths: dict[int, Path], overwrite: bool, photos: list[Path], photo_dirs: list[Path]) -> None:
    """Refuses pictures that would replace an existing file (unless ``overwrite``) and, ``overwrite`` or not,
    one of the ``photos`` the test reads or any file already in the dataset's image folders ``photo_dirs``."""
    inputs = {p.resolve() for p in photos}
    for path in paths.values():
        in_photos = next((d for d in photo_dirs if path.exists() and is_within(path, d)), None)
        if path.resolve() in inputs or in_photos is not None:
            what = f"a file in the image folder {in_photos}" if in_photos is not None else "a photo of the dataset"
            raise OilleakError(f"--show-dir: picture {path} would replace {what}; oilleak never writes "
                               "over your photos, --overwrite included: choose a --show-dir outside the dataset")
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OilleakError(
            f"--show-dir: {len(existing)} pictures would overwrite existing files (e.g. {existing[0]}); "
            "choose an empty folder or add --overwrite"
        )


def write_detections(out: Path, images: list[ImageResult], cat_ids: list[int]) -> None:
    """``.json``: COCO results (bbox, segmentation RLE, score, category_id: the dataset's ids), for
    pycocotools or other tools; to score masks with pycocotools yourself, drop ``bbox`` from the entries
    first (or it takes box areas for the size buckets). A ``.pkl`` / ``.pickle`` is mmdetection's result
    pickle, which needs the dataset: :func:`oilleak.evaluate.mmdet_results.write_mmdet_results`."""
    if out.suffix.lower() != ".json":
        raise ValueError(f"write_detections writes COCO results JSON, not {out.name}; a pickle is write_mmdet_results'")
    entries = [
        {**box, "segmentation": seg["segmentation"]}
        for image in images
        for box, seg in zip(image.coco_results(cat_ids, "bbox"), image.coco_results(cat_ids, "segm"))
    ]
    with atomic_write(out) as f:
        f.write(json.dumps(entries).encode("utf-8"))


def _ground_truth(coco, image_id: int, cat_ids: list[int], height: int, width: int):
    label_of = {c: k for k, c in enumerate(cat_ids)}
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=cat_ids)) if not a.get("iscrowd", 0)]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32)
    masks = np.stack([coco.annToMask(a).astype(bool) for a in anns]) if anns else np.zeros((0, height, width), bool)
    return boxes.reshape(-1, 4), [label_of[a["category_id"]] for a in anns], masks


def write_pictures(dataset, images: list[ImageResult], paths: dict[int, Path], class_names: list[str],
                   score_thr: float, progress: bool) -> None:
    """Ground truth (left) beside the predictions at or above ``score_thr`` (right) for every image."""
    from oilleak.data.coco import decode_masks
    from oilleak.data.transforms import load_image

    path_of = {record.image_id: record.path for record in dataset.records}
    cat_ids = list(dataset.cat_ids)
    with progress_bar(progress, len(images), "drawing") as advance:
        for r in images:
            image = load_image(path_of[r.image_id])
            boxes, labels, masks = _ground_truth(dataset.coco, r.image_id, cat_ids, r.height, r.width)
            left = draw_instances(image, boxes, labels, class_names, masks=masks)
            keep = np.flatnonzero(r.scores >= score_thr)
            pred_masks = decode_masks([r.masks[i] for i in keep], r.height, r.width)
            right = draw_instances(image, r.boxes[keep], r.labels[keep].tolist(), class_names, masks=pred_masks,
                                   scores=r.scores[keep].tolist())
            target = paths[r.image_id]
            target.parent.mkdir(parents=True, exist_ok=True)
            save_image(side_by_side(left, right, ("ground truth", f"prediction (score >= {score_thr})")), target)
            advance(1)


def _report_dir(work_dir: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = work_dir / f"test-{stamp}", 1
    while path.exists():
        n += 1
        path = work_dir / f"test-{stamp}-{n}"
    return path


def run_test(
    config: Config,
    ckpt: Path,
    *,
    split: str = "val",
    work_dir: Path | None = None,
    show_dir: Path | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = "cpu",
    progress: bool = True,
    on_load: Callable[[str], None] | None = None,
    config_name: str = "your config",
    overrides: list[str] | None = None,
) -> TestOutcome | None:
    """Evaluate ``ckpt`` on ``split`` and write everything (module docstring); ``on_load`` receives the
    weight-load report of an mmdetection checkpoint, or what an oilleak checkpoint changed of the config,
    before the (long) inference starts; ``config_name`` is how data errors refer to the config file;
    ``overrides`` are the ``--set`` values (they win over the checkpoint's model and scale).

    Under torchrun each rank predicts every world_size-th image (and draws its ``show_dir`` pictures); rank 0
    gathers the detections, evaluates and writes the reports and ``out``, the same files as one process
    writes. Rank 0 returns the outcome, the other ranks None."""
    from oilleak.data.dataset import build_dataset

    runtime = distributed.start_if_launched(None if device is None else str(device))
    splits = [s for s in ("train", "val", "test") if s != "test" or config.data.test is not None]
    root = config.data.root()
    check_out_path(out, overwrite, (ckpt, *(root / config.data.split(s).ann_file for s in splits)))
    dataset = build_dataset(config.data, split, train=False, config_name=config_name)
    class_names, cat_ids = list(config.data.classes), list(dataset.cat_ids)
    pictures = show_paths(show_dir, [(r.image_id, r.file_name) for r in dataset.records]) if show_dir else {}
    _check_show_dir(pictures, overwrite, [r.path for r in dataset.records],
                    [root / config.data.split(s).img_dir for s in splits])
    model, load_note, config = load_model_for_test(ckpt, config, overrides)
    if load_note and on_load is not None and runtime.is_main:
        on_load(load_note)
    dataset.scale = tuple(config.data.scale)  # the scale the model was trained at (checked data, same records)

    error = None
    try:
        images = predict_dataset(prepare_for_inference(model, runtime.device), dataset, device=runtime.device, workers=config.data.workers,
                                 progress=progress and runtime.is_main, runtime=runtime)
    except OilleakError as exc:  # e.g. an unreadable image: every rank stops with it instead of waiting
        images, error = [], str(exc)
    distributed.raise_if_any_failed(error, runtime)
    if show_dir is not None:
        write_pictures(dataset, images, pictures, class_names, config.predict.score_thr, progress and runtime.is_main)
    parts = distributed.gather_to_main(images, runtime)
    distributed.stop(runtime)
    if parts is None:
        return None
    images = distributed.unshard(parts)

    result = coco_evaluate(dataset.coco, images, class_names, cat_ids)
    report_dir = _report_dir(Path(work_dir or config.train.work_dir))
    thr = config.predict.score_thr
    matrix = confusion_matrix(dataset.coco, images, cat_ids, score_thr=thr)
    extra = {
        "checkpoint": str(ckpt),
        "split": split,
        "ann_file": str(config.data.root() / config.data.split(split).ann_file),
        "images": len(images),
        "mask_merge": config.model.mask_merge,  # the model was built from config.model: "last" (mmdet 3.3) or "mean" (2.x)
        "confusion_matrix": {"labels": [*class_names, "background"], "score_thr": thr, "iou_thr": MATCH_IOU,
                             "rows_ground_truth_columns_predicted": matrix.tolist()},
    }
    written = write_reports(result, report_dir, extra)
    written += plot_pr_curves(result, report_dir)
    written.append(plot_confusion_matrix(matrix, class_names, report_dir / "confusion_matrix.png", thr))
    if out is not None:
        if out.suffix.lower() in MMDET_SUFFIXES:
            write_mmdet_results(out, images, dataset)
        else:
            write_detections(out, images, cat_ids)
        written.append(out)
    if show_dir is not None:
        written.append(show_dir)
    return TestOutcome(result, report_dir, written)
