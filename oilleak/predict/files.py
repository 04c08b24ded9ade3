"""What `oilleak predict` writes for each image, under the output folder:

- ``overlays/NAME.jpg``: the image with masks, outlines, boxes, class names and scores; with no instance,
  a banner: "no leak found at score >= THR (highest score S)";
- ``instances/NAME.json``: ``{"source", "width", "height", "classes", "score_thr", "leak_area_px",
  "leak_area_share", "leak_area_share_per_class": {class: share}, "instances": [{"class", "label", "score", "box": [x1, y1, x2, y2], "polygons":
  [[[x, y], ...], ...], "area_px", "area_share"}]}``: polygons are the outlines of the mask (one per separate
  part), holes inside a mask are filled (polygons cannot describe them; see ``instances.fill_holes``),
  ``area_px`` counts the mask's pixels, the leak area is the union of all masks (per class: of that class's masks);
  ``oilleak serve`` answers with the same record (:func:`instances_record`);
- with ``--save-labelme``: ``labelme/NAME.json`` beside a byte-for-byte copy of the image, one polygon shape
  per outline, the instance's parts sharing a ``group_id`` and its score in ``description``. The folder is a
  labelme project: correct it in labelme, then ``oilleak convert OUT/labelme ...`` turns it into training data;
- ``summary.csv``: ONE ROW PER IMAGE (failed ones too): file, name, width, height, instances, one count
  column per class, leak_area_px, leak_area_share, status ("ok" or why it failed).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from oilleak.paths import inside
from oilleak.predict.instances import Instance
from oilleak.visualize import banner, draw_instances, paint_mask_crops, save_image

LABELME_VERSION = "5.5.0"  # the format of labelme 5 (description field); labelme 4 and 5 read it


def output_file(out_dir: Path, folder: str, name: str, suffix: str) -> Path:
    """``OUT/folder/NAME.suffix``: refused when it resolves outside OUT (a symbolic link in OUT, a name that
    climbs out of it), so nothing `predict` writes lands outside the folder the user named."""
    return inside(out_dir, f"{folder}/{name}{suffix}", f"output of {name!r}", "choose a new, empty --out-dir")


def union_area(instances: list[Instance]) -> int:
    """Pixels covered by at least one mask, counted over the extent of the instances only."""
    if not instances:
        return 0
    x0 = min(i.origin[0] for i in instances)
    y0 = min(i.origin[1] for i in instances)
    x1 = max(i.origin[0] + i.mask.shape[1] for i in instances)
    y1 = max(i.origin[1] + i.mask.shape[0] for i in instances)
    canvas = np.zeros((y1 - y0, x1 - x0), bool)
    for inst in instances:
        x, y = inst.origin
        h, w = inst.mask.shape
        canvas[y - y0 : y - y0 + h, x - x0 : x - x0 + w] |= inst.mask
    return int(canvas.sum())


def overlay_image(image: np.ndarray, instances: list[Instance], class_names: list[str]) -> np.ndarray:
    """The image with the instances' masks, outlines, boxes, class names and scores drawn on it."""
    painted = paint_mask_crops(image, [i.mask for i in instances], [i.origin for i in instances],
                               [i.label for i in instances], len(class_names))
    boxes = np.array([i.box for i in instances], np.float32).reshape(-1, 4)
    return draw_instances(painted, boxes, [i.label for i in instances], class_names,
                          scores=[i.score for i in instances])


def nothing_found(score_thr: float, top_score: float | None) -> str:
    """What an image (or a run) without an instance at or above ``score_thr`` says; ``top_score``: the
    highest score the model gave anything below it (None: unknown or nothing at all)."""
    seen = "" if top_score is None else f" (highest score {top_score:.2f})"
    return f"no leak found at score >= {score_thr:g}{seen}"


def write_overlay(path: Path, image: np.ndarray, instances: list[Instance], class_names: list[str],
                  score_thr: float = 0.0, top_score: float | None = None) -> None:
    """The drawn instances; with none, a banner says so (an overlay identical to the photo looks unfinished)."""
    drawn = overlay_image(image, instances, class_names)
    if not instances:
        drawn = banner(drawn, nothing_found(score_thr, top_score))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(drawn, path)


def instances_record(source: str, height: int, width: int, instances: list[Instance], polygons: list,
                     class_names: list[str], score_thr: float) -> dict:
    pixels = height * width
    leak = union_area(instances)
    return {
        "source": source,
        "width": width,
        "height": height,
        "classes": class_names,
        "score_thr": score_thr,
        "leak_area_px": leak,
        "leak_area_share": leak / pixels,
        "leak_area_share_per_class": {
            name: union_area([i for i in instances if i.label == k]) / pixels for k, name in enumerate(class_names)
        },
        "instances": [
            {
                "class": class_names[inst.label],
                "label": inst.label,
                "score": round(inst.score, 5),
                "box": [round(v, 2) for v in inst.box],
                "polygons": [[list(p) for p in poly] for poly in polys],
                "area_px": inst.area,
                "area_share": inst.area / pixels,
            }
            for inst, polys in zip(instances, polygons)
        ],
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def write_labelme(json_path: Path, image_source: Path, height: int, width: int, instances: list[Instance],
                  polygons: list, class_names: list[str]) -> None:
    """A labelme file with a copy of the image beside it (same stem as the JSON, original extension)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    image_copy = json_path.with_suffix(image_source.suffix.lower())
    shutil.copyfile(image_source, image_copy)  # the original bytes: same pixels, same EXIF orientation
    shapes = [
        {
            "label": class_names[inst.label],
            "points": [list(p) for p in poly],
            "group_id": k + 1,  # labelme's converters join the shapes of one (label, group_id) into one instance
            "description": f"oilleak score {inst.score:.3f}",
            "shape_type": "polygon",
            "flags": {},
        }
        for k, (inst, polys) in enumerate(zip(instances, polygons))
        for poly in polys
    ]
    payload = {
        "version": LABELME_VERSION,
        "flags": {},
        "shapes": shapes,
        "imagePath": image_copy.name,
        "imageData": None,
        "imageHeight": height,
        "imageWidth": width,
    }
    json_path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


class SummaryCsv:
    """summary.csv, one row per image, flushed as it goes so an interrupted run keeps its rows."""

    def __init__(self, path: Path, class_names: list[str]):
        self.class_names = class_names
        self._file = path.open("w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        self._writer.writerow(["file", "name", "width", "height", "instances", *[f"n_{c}" for c in class_names],
                               "leak_area_px", "leak_area_share", "status"])

    def ok(self, name: str, record: dict) -> None:
        """The row of an image from its :func:`instances_record` (the leak area is not computed twice)."""
        instances = record["instances"]
        counts = [sum(1 for i in instances if i["label"] == k) for k in range(len(self.class_names))]
        self._row([record["source"], name, record["width"], record["height"], len(instances), *counts,
                   record["leak_area_px"], f"{record['leak_area_share']:.6f}", "ok"])

    def failed(self, source: str, name: str, reason: str) -> None:
        self._row([source, name, "", "", "", *([""] * len(self.class_names)), "", "", f"failed: {reason}"])

    def _row(self, row: list) -> None:
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def join_summaries(parts: list[Path], path: Path, names: list[str]) -> None:
    """One summary.csv from the ranks' part files (then removed): the rows of inputs that gave no image
    (empty name) first, then the images in the order of ``names``."""
    header, rows = None, []
    for part in parts:
        with part.open(newline="", encoding="utf-8") as f:
            header, *part_rows = list(csv.reader(f))
        rows += part_rows
    order = {name: k for k, name in enumerate(names)}
    rows.sort(key=lambda row: order.get(row[1], -1))  # stable: the no-image rows keep their order
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    tmp.replace(path)
    for part in parts:
        part.unlink()
