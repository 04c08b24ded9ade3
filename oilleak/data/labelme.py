"""labelme folder -> the COCO layout oilleak and mmdetection train on (``oilleak convert``).

``OUT/annotations/{train,val}.json`` (COCO) and the images in ``OUT/train/`` and ``OUT/val/``.

What a labelme file means here (labelme's own semantics, see its ``label_file.py``):
- polygon, rectangle (two corners) and circle (centre, point on the rim) shapes are areas; line, linestrip,
  point and points shapes are not, and are skipped with a warning, as are shape types we do not know;
- shapes that share a ``group_id`` are one instance with several polygons;
- the image is the file at ``imagePath`` (relative to the JSON file, inside SRC), else the base64 ``imageData``;
- labelme shows an image with its EXIF orientation applied, so the points are in the rotated frame.

Everything is read and checked before anything is written; all problems are reported together.
SRC is only read.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import io
import json
import math
import posixpath
import random
import shutil
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils

from oilleak import __version__
from oilleak.data.transforms import EXIF_ORIENTATION, SWAPPING_ORIENTATIONS
from oilleak.errors import OilleakError
from oilleak.files import atomic_write
from oilleak.paths import escape_reason, inside

SPLITS = ("train", "val")
AREA_SHAPE_TYPES = ("polygon", "rectangle", "circle")
LINE_SHAPE_TYPES = ("line", "linestrip", "point", "points")
# A 64-gon covers 99.8% of its circle; the gap to the rim stays under 1.2 px up to a radius of 1000 px.
CIRCLE_POINTS = 64
# File suffix of an image embedded as imageData, by its PIL format.
SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif", "WEBP": ".webp"}
MAX_ERRORS_SHOWN = 100


@dataclass(frozen=True)
class ConvertWarning:
    """Something skipped or changed. ``kind`` groups warnings of the same sort in the summary."""

    kind: str
    file: str  # labelme file, relative to SRC ("" for the dataset as a whole)
    detail: str

    def __str__(self) -> str:
        return f"{self.file}: {self.detail}" if self.file else self.detail


@dataclass
class ClassCounts:
    images: int = 0  # images with at least one instance of the class
    instances: int = 0
    multipart: int = 0  # instances made of several polygons (shapes sharing a group_id)


@dataclass
class SplitSummary:
    images: int = 0
    negatives: int = 0  # images kept without any instance
    classes: dict[str, ClassCounts] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return sum(c.instances for c in self.classes.values())


@dataclass
class ConvertReport:
    out: Path
    classes: list[str]  # category ids are 1..N in this order
    classes_from_labels: bool  # True when no class list was given and the sorted labels were used
    splits: dict[str, SplitSummary]
    warnings: list[ConvertWarning]


@dataclass
class _Instance:
    label: str
    polygons: list[list[float]]  # flat [x1, y1, x2, y2, ...], each with >= 3 points, inside the image
    area: float
    bbox: list[float]  # x, y, w, h


@dataclass
class _Image:
    """Where a labelme file's image is and what it looks like once its EXIF orientation is applied."""

    file: Path | None  # None: embedded in the labelme file as imageData
    suffix: str
    orientation: int
    width: int
    height: int


@dataclass
class _Entry:
    """One labelme file, read and checked."""

    rel: str  # path of the labelme file relative to SRC, with "/"
    json_path: Path
    image: _Image
    instances: list[_Instance]
    file_name: str = ""  # name in the split folder, unique over the dataset


def convert_labelme(
    src: str | Path,
    out: str | Path,
    classes: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    overwrite: bool = False,
) -> ConvertReport:
    """Convert every labelme JSON under ``src`` into ``out/annotations/{train,val}.json`` + images.

    ``classes`` fixes the category names and their ids (1..N in order); without it the sorted labels are used.
    Raises :class:`OilleakError` listing every problem found before anything is written.
    """
    src, out = Path(src).resolve(), Path(out).resolve()
    _check_locations(src, out, overwrite)
    if not 0.0 <= val_fraction <= 1.0:
        raise OilleakError(f"--val-fraction is {val_fraction}; use a fraction between 0 and 1 (e.g. 0.2)")
    class_list = _check_class_names(classes) if classes is not None else None

    json_files = _find_labelme_files(src)
    warnings: list[ConvertWarning] = []
    errors: list[str] = []
    entries = [e for path in json_files if (e := _read_labelme(src, path, warnings, errors)) is not None]
    if not entries and not errors:
        raise OilleakError(f"{src}: none of the {len(json_files)} JSON files is a labelme file (no 'shapes')")
    class_list = _resolve_classes(entries, class_list, errors, warnings)
    if errors:
        raise OilleakError(_problems(src, errors))

    _assign_file_names(entries)
    splits = _split(entries, val_fraction, seed)
    for name in SPLITS:
        if not splits[name] and (name == "train" or val_fraction > 0):
            warnings.append(ConvertWarning("empty split", "", f"{name} has no images ({len(entries)} in all)"))
    _write(out, splits, class_list, overwrite)
    return ConvertReport(
        out=out,
        classes=class_list,
        classes_from_labels=classes is None,
        splits={name: _summarise(splits[name], class_list) for name in SPLITS},
        warnings=warnings,
    )


def _problems(src: Path, errors: list[str]) -> str:
    shown = errors[:MAX_ERRORS_SHOWN]
    more = f"\n... and {len(errors) - len(shown)} more" if len(errors) > len(shown) else ""
    return f"{len(errors)} problem(s) in {src}, nothing written:\n" + "\n".join(shown) + more


def _check_locations(src: Path, out: Path, overwrite: bool) -> None:
    if not src.is_dir():
        raise OilleakError(f"SRC {src} is not a folder; give the folder that holds the labelme JSON files")
    if out == src or src in out.parents:
        raise OilleakError(f"OUT {out} is inside SRC {src}; SRC is never modified: choose an OUT outside it")
    written = [out / "annotations", *(out / s for s in SPLITS)]
    for folder in written:  # e.g. a symbolic link OUT/train -> SRC: --overwrite would write over the photos
        inside(out, folder.name, f"OUT folder {folder}", f"remove the link {folder} or choose another OUT")
    written = [w.resolve() for w in written]
    if any(src == w or w in src.parents for w in written):
        raise OilleakError(
            f"SRC {src} lies in a folder convert writes ({', '.join(str(w) for w in written)}); "
            "move the labelme files or choose another OUT"
        )
    if out.exists() and not out.is_dir():
        raise OilleakError(f"OUT {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OilleakError(
            f"OUT {out} is not empty; choose an empty or new folder, or pass --overwrite to replace "
            "annotations/train.json, annotations/val.json, train/ and val/ there"
        )


def _check_class_names(classes: Sequence[str]) -> list[str]:
    names = [c.strip() for c in classes]
    if not names or any(not n for n in names):
        raise OilleakError(f"--classes {','.join(classes)!r} has an empty name; give comma-separated names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise OilleakError(f"--classes repeats {', '.join(repeated)}; each class name once")
    return names


def _find_labelme_files(src: Path) -> list[Path]:
    # Hidden folders hold copies, not data (.git, .ipynb_checkpoints with "-checkpoint.json" duplicates).
    files = sorted(
        p for p in src.rglob("*.json") if not any(part.startswith(".") for part in p.relative_to(src).parts)
    )
    if not files:
        raise OilleakError(f"SRC {src} holds no .json files (searched recursively); give the labelme folder")
    return files


def _read_labelme(src: Path, path: Path, warnings: list[ConvertWarning], errors: list[str]) -> _Entry | None:
    rel = path.relative_to(src).as_posix()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        errors.append(f"{rel}: not valid JSON ({exc}); repair or remove the file")
        return None
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        warnings.append(ConvertWarning("not labelme", rel, "no 'shapes' list, not a labelme file; skipped"))
        return None
    n_errors = len(errors)
    image = _read_image(path, rel, data, errors)
    instances = _read_shapes(rel, data["shapes"], image, warnings, errors) if image else []
    if len(errors) > n_errors or image is None:
        return None
    return _Entry(rel=rel, json_path=path, image=image, instances=instances)


def _read_image(json_path: Path, rel: str, data: dict, errors: list[str]) -> _Image | None:
    image_path = str(data.get("imagePath") or "")
    escape = escape_reason(image_path, posixpath.dirname(rel)) if image_path else None
    if escape is not None and not data.get("imageData"):
        errors.append(f"{rel}: imagePath {image_path!r} {escape}, outside SRC (convert reads only inside SRC); "
                      "give as SRC a folder that holds both the labelme files and their images, with imagePath "
                      "relative to the JSON file (as labelme writes it)")
        return None
    # labelme on Windows writes imagePath with backslashes. A path outside SRC is never opened: imageData it is.
    on_disk = json_path.parent / image_path.replace("\\", "/") if image_path and escape is None else None
    if on_disk is not None and on_disk.is_file():
        where, file = str(on_disk), on_disk
        raw = on_disk.read_bytes()
    elif data.get("imageData"):
        where, file = f"imageData in {rel}", None
        try:
            raw = base64.b64decode(data["imageData"], validate=True)
        except (binascii.Error, ValueError, TypeError) as exc:
            errors.append(f"{rel}: imageData is not valid base64 ({exc}); re-save the file in labelme")
            return None
    else:
        looked = f"{on_disk}" if on_disk else "no imagePath given"
        errors.append(f"{rel}: image missing: {looked}, and no imageData; put the image there or fix imagePath")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's warnings on damaged EXIF: a real problem raises below
            with Image.open(io.BytesIO(raw)) as img:
                img.load()
                orientation = int(img.getexif().get(EXIF_ORIENTATION, 1))
                width, height = img.size
                image_format = img.format
    except UnidentifiedImageError:  # its text names an in-memory buffer, not the file
        errors.append(f"{rel}: cannot read image {where} (not an image Pillow recognises: damaged, truncated or "
                      "another kind of file); replace it with a readable image")
        return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        errors.append(f"{rel}: cannot read image {where} ({exc}); replace it with a readable image")
        return None
    orientation = orientation if 2 <= orientation <= 8 else 1
    if orientation in SWAPPING_ORIENTATIONS:
        width, height = height, width
    labelled = (data.get("imageHeight"), data.get("imageWidth"))
    if None not in labelled and tuple(labelled) != (height, width):
        hint = ""
        if tuple(labelled) == (width, height) and orientation in SWAPPING_ORIENTATIONS:
            hint = (
                f" The JSON matches the image before its EXIF orientation ({orientation}) is applied: it was "
                "labelled with a tool that ignores EXIF; remove the orientation tag from the image file."
            )
        errors.append(
            f"{rel}: imageHeight x imageWidth is {labelled[0]}x{labelled[1]} but image {where} is "
            f"{height}x{width} (height x width, EXIF orientation applied); the labels belong to another image "
            f"size: fix imagePath or re-label.{hint}"
        )
        return None
    suffix = file.suffix if file is not None and file.suffix else SUFFIX_OF_FORMAT.get(image_format, ".img")
    return _Image(file=file, suffix=suffix, orientation=orientation, width=width, height=height)


def _read_shapes(
    rel: str, shapes: list, image: _Image, warnings: list[ConvertWarning], errors: list[str]
) -> list[_Instance]:
    """labelme shapes -> instances: one per group_id and one per ungrouped shape, in order of first shape."""
    parts: dict[tuple, tuple[str, list[list[float]]]] = {}
    labels_of_group: dict[object, set[str]] = defaultdict(set)
    for index, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            errors.append(f"{rel}: shape {index} is not an object; repair the file")
            continue
        label = str(shape.get("label") or "").strip()
        name = f"shape {index} ({label!r})"
        if not label:
            errors.append(f"{rel}: shape {index} has an empty label; give it a class name in labelme")
            continue
        group_id = shape.get("group_id")
        if group_id is not None:
            labels_of_group[group_id].add(label)
        shape_type = shape.get("shape_type") or "polygon"  # labelme < 3 wrote no shape_type
        if shape_type in LINE_SHAPE_TYPES:
            warnings.append(ConvertWarning("no area", rel, f"{name}: a {shape_type} has no area; skipped"))
            continue
        if shape_type not in AREA_SHAPE_TYPES:
            detail = f"{name}: shape_type {shape_type!r} is not supported; skipped"
            warnings.append(ConvertWarning("unknown shape type", rel, detail))
            continue
        points = _parse_points(shape.get("points"))
        if points is None:
            errors.append(f"{rel}: {name} 'points' is not a list of [x, y] numbers; repair the file")
            continue
        polygon = _outline(shape_type, points)
        if len(polygon) < 3:
            warnings.append(
                ConvertWarning("too few points", rel, f"{name}: {shape_type} with {len(points)} point(s); skipped")
            )
            continue
        clipped = _clip_to_image(polygon, image.width, image.height)
        flat = [coord for point in clipped for coord in point]
        if len(clipped) < 3 or _mask_area([flat], image) == 0:
            where = "lies outside the image" if len(clipped) < 3 else "has zero area"
            warnings.append(ConvertWarning("zero area", rel, f"{name}: {shape_type} {where}; skipped"))
            continue
        if clipped != polygon:
            warnings.append(ConvertWarning("clipped", rel, f"{name}: points outside the image clipped to it"))
        key = ("group", group_id) if group_id is not None else ("shape", index)
        parts.setdefault(key, (label, []))[1].append(flat)
    for group_id, labels in labels_of_group.items():
        if len(labels) > 1:
            errors.append(
                f"{rel}: group_id {group_id} joins shapes of different labels ({', '.join(sorted(labels))}); "
                "one instance has one class: give each label its own group_id"
            )
    return [_instance(label, polygons, image) for label, polygons in parts.values()]


def _parse_points(points: object) -> list[tuple[float, float]] | None:
    if not isinstance(points, list):
        return None
    parsed = []
    for point in points:
        if not (isinstance(point, (list, tuple)) and len(point) == 2):
            return None
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in point):
            return None
        parsed.append((float(point[0]), float(point[1])))
    return parsed


def _outline(shape_type: str, points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The polygon of an area shape ([] when it has too few points to make one)."""
    if shape_type == "polygon":
        return points
    if len(points) < 2:
        return []
    if shape_type == "rectangle":  # two opposite corners
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
        return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    (cx, cy), (rx, ry) = points[0], points[1]  # circle: centre, a point on the rim
    radius = math.hypot(rx - cx, ry - cy)
    angles = [2 * math.pi * k / CIRCLE_POINTS for k in range(CIRCLE_POINTS)]
    return [(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles]


def _clip_to_image(polygon: list[tuple[float, float]], width: int, height: int) -> list[tuple[float, float]]:
    """The part of the polygon inside [0, width] x [0, height] (Sutherland-Hodgman, one image edge at a time).

    Clamping each point instead would bend the edges that cross the border and change the mask.
    """
    if all(0 <= x <= width and 0 <= y <= height for x, y in polygon):
        return polygon
    edges = (
        (lambda p: p[0] >= 0, lambda a, b: _cross_x(a, b, 0.0)),
        (lambda p: p[0] <= width, lambda a, b: _cross_x(a, b, float(width))),
        (lambda p: p[1] >= 0, lambda a, b: _cross_y(a, b, 0.0)),
        (lambda p: p[1] <= height, lambda a, b: _cross_y(a, b, float(height))),
    )
    for inside, crossing in edges:
        points, polygon = polygon, []
        for i, current in enumerate(points):
            previous = points[i - 1]
            if inside(current):
                if not inside(previous):
                    polygon.append(crossing(previous, current))
                polygon.append(current)
            elif inside(previous):
                polygon.append(crossing(previous, current))
        if not polygon:
            break
    return polygon


def _cross_x(a: tuple[float, float], b: tuple[float, float], x: float) -> tuple[float, float]:
    t = (x - a[0]) / (b[0] - a[0])
    return (x, a[1] + t * (b[1] - a[1]))


def _cross_y(a: tuple[float, float], b: tuple[float, float], y: float) -> tuple[float, float]:
    t = (y - a[1]) / (b[1] - a[1])
    return (a[0] + t * (b[0] - a[0]), y)


def _mask_area(polygons: list[list[float]], image: _Image) -> float:
    # Every polygon has >= 6 numbers: pycocotools reads a first polygon of 4 numbers as a box.
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, image.height, image.width))
    return float(mask_utils.area(rle))


def _instance(label: str, polygons: list[list[float]], image: _Image) -> _Instance:
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
    return _Instance(label=label, polygons=polygons, area=_mask_area(polygons, image), bbox=bbox)


def _resolve_classes(
    entries: list[_Entry], classes: list[str] | None, errors: list[str], warnings: list[ConvertWarning]
) -> list[str]:
    files_of_label: dict[str, list[str]] = defaultdict(list)
    for entry in entries:
        for label in dict.fromkeys(inst.label for inst in entry.instances):
            files_of_label[label].append(entry.rel)
    if classes is None:
        if not files_of_label and not errors:
            errors.append("no usable shape in any labelme file, so no class names: pass --classes")
        return sorted(files_of_label)
    unknown = sorted(set(files_of_label) - set(classes))
    for label in unknown:
        files = files_of_label[label]
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        close = difflib.get_close_matches(label, classes, n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        errors.append(f"label {label!r} is not in --classes{maybe}: {len(files)} file(s): {shown}")
    if unknown:
        errors.append(
            f"--classes is {','.join(classes)} but the labelme files use {','.join(sorted(files_of_label))}: "
            "pass --classes with the labels the files use, or rename the labels in labelme"
        )
    for name in classes:
        if name not in files_of_label:
            warnings.append(ConvertWarning("unused class", "", f"class {name!r} has no instance in any file"))
    return classes


def _assign_file_names(entries: list[_Entry]) -> None:
    """a/b/img.json -> img.jpg, the name the user knows, when no other labelme file has that name (in any
    folder, in either split, ignoring case); a/b/img.json -> a__b__img.jpg when several have."""
    plain = [Path(entry.rel).stem + entry.image.suffix for entry in entries]
    count = Counter(name.casefold() for name in plain)
    taken: set[str] = set()
    for entry, name in zip(entries, plain):
        stem = entry.rel[: -len(".json")].replace("/", "__") if count[name.casefold()] > 1 else Path(entry.rel).stem
        name, k = stem + entry.image.suffix, 2
        while name.casefold() in taken:  # a__b/img.json and a/b__img.json would meet; so would case-only twins
            name, k = f"{stem}__{k}{entry.image.suffix}", k + 1
        taken.add(name.casefold())
        entry.file_name = name


def _split(entries: list[_Entry], val_fraction: float, seed: int) -> dict[str, list[_Entry]]:
    """The same files and seed give the same split; each split keeps the files' sorted order."""
    n = len(entries)
    n_val = round(n * val_fraction)
    if n >= 2 and 0 < val_fraction < 1:  # a fraction strictly between 0 and 1 leaves both splits something
        n_val = min(max(n_val, 1), n - 1)
    shuffled = list(entries)
    random.Random(seed).shuffle(shuffled)
    val = {e.rel for e in shuffled[:n_val]}
    return {"train": [e for e in entries if e.rel not in val], "val": [e for e in entries if e.rel in val]}


def _write(out: Path, splits: dict[str, list[_Entry]], classes: list[str], overwrite: bool) -> None:
    if overwrite:  # only what convert writes; anything else in OUT stays
        for split in SPLITS:
            (out / "annotations" / f"{split}.json").unlink(missing_ok=True)
            shutil.rmtree(out / split, ignore_errors=True)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        for entry in splits[split]:
            _write_image(entry, inside(out / split, entry.file_name, f"image {entry.rel}", "report this as a bug"))
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        with atomic_write(out / "annotations" / f"{split}.json", "w", encoding="utf-8") as f:
            f.write(json.dumps(_coco(splits[split], classes)))


def _write_image(entry: _Entry, dest: Path) -> None:
    if entry.image.file is not None:
        raw = entry.image.file.read_bytes()
    else:
        raw = base64.b64decode(json.loads(entry.json_path.read_text(encoding="utf-8"))["imageData"])
    if entry.image.orientation == 1:  # the pixels are already as labelled: copy, never re-encode
        dest.write_bytes(raw)
        return
    with Image.open(io.BytesIO(raw)) as img:
        image_format = img.format
        upright = ImageOps.exif_transpose(img)  # also drops the orientation tag from its EXIF
        options = {"quality": 95} if image_format == "JPEG" else {}
        icc_profile = img.info.get("icc_profile")
        upright.save(dest, format=image_format, exif=upright.getexif(), icc_profile=icc_profile, **options)


def _coco(entries: list[_Entry], classes: list[str]) -> dict:
    category_id = {name: i for i, name in enumerate(classes, start=1)}
    images, annotations = [], []
    for image_id, entry in enumerate(entries, start=1):
        images.append(
            {
                "id": image_id,
                "file_name": entry.file_name,
                "width": entry.image.width,
                "height": entry.image.height,
                "labelme": entry.rel,
            }
        )
        for inst in entry.instances:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id[inst.label],
                    "segmentation": inst.polygons,
                    "area": inst.area,
                    "bbox": inst.bbox,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "labelme -> COCO by oilleak convert", "version": __version__},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": name, "supercategory": name} for name, i in category_id.items()],
    }


def _summarise(entries: list[_Entry], classes: list[str]) -> SplitSummary:
    summary = SplitSummary(images=len(entries), classes={name: ClassCounts() for name in classes})
    for entry in entries:
        if not entry.instances:
            summary.negatives += 1
        for label in dict.fromkeys(inst.label for inst in entry.instances):
            summary.classes[label].images += 1
        for inst in entry.instances:
            summary.classes[inst.label].instances += 1
            summary.classes[inst.label].multipart += len(inst.polygons) > 1
    return summary
