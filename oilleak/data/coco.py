"""COCO splits: loading through pycocotools, class matching by name (:mod:`oilleak.data.class_names`),
semantic maps. Image file names must stay inside the split's image folder (:mod:`oilleak.paths`).

:func:`load_split` reads one split and checks it as it reads; every problem names the split, the image file
and the annotation id. Errors make the split unusable; warnings describe a repair (a box clipped, an
annotation dropped or ignored). The dataset check over train and val and its report are
:mod:`oilleak.data.check`.

Labels: the label of a COCO category is the index of its NAME in ``data.classes``, never its position in
the json (mmdetection uses the json order, which silently swaps class names when the two orders differ).

Semantic maps (HTC's semantic branch): read from ``<sem_dir>/<image stem>.png`` when the split's ``sem_dir``
folder exists, otherwise derived from the instance masks (:func:`derive_sem_map`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image
from pycocotools.coco import COCO

from oilleak.config import DataConfig
from oilleak.data.class_names import match_classes
from oilleak.data.rle import rle_string_runs
from oilleak.data.transforms import EXIF_ORIENTATION, SWAPPING_ORIENTATIONS
from oilleak.errors import OilleakError
from oilleak.paths import escape_reason
from oilleak.structures import SEM_IGNORE

SMALL_AREA = 32 * 32  # COCO's "small" objects: mask area below 32 x 32 px
# The smallest anchors of every preset: anchor scale 8 x the finest stride 4 = 32 px. An object whose box
# is smaller than that at the training scale matches no anchor well: the RPN rarely proposes it.
SMALLEST_ANCHOR = 32
BELOW_ANCHORS_WARN = 0.10  # warn when this share of a split's instances is below the smallest anchors
BOX_TOLERANCE = 1.0  # boxes may overhang the image this much (labelme points dragged onto the border) silently

# How to fix each kind of problem; printed once per kind.
FIXES = {
    "annotation file": "check data.data_root and data.<split>.ann_file, or create the file with `oilleak convert`",
    "class names": "make data.classes and the json's categories[].name agree",
    "no validation split": "create it (`oilleak convert --val-fraction 0.2`) or check data.val.ann_file",
    "empty split": "add images to the split (`oilleak convert` writes train and val)",
    "image folder": "check data.data_root and data.<split>.img_dir",
    "invalid image entry": "every images[] entry needs an integer id, a file_name and positive width/height",
    "image path outside the image folder": "put the image inside data.<split>.img_dir and give its file_name "
                                           "relative to that folder (no leading '/', no '..')",
    "duplicate image": "give every image a unique id and file_name in the json",
    "missing image file": "copy the image into the image folder or remove it from the json",
    "unreadable image": "replace the file with a readable JPEG/PNG or remove it from the json",
    "image size mismatch": "re-create the annotations for this image (`oilleak convert` reads the real size)",
    "invalid annotation": "every annotations[] entry needs a unique integer id, image_id and category_id",
    "missing image id": "remove the annotation or add its image to images[]",
    "unknown category id": "add the category to categories[] or fix the annotation's category_id",
    "invalid segmentation": "give the annotation polygons [[x1, y1, x2, y2, ...]] (>= 3 points) or an RLE of the image size",
    "invalid box": "give the annotation a bbox [x, y, width, height] inside the image",
    "box outside image": "fix or delete the annotation: it does not overlap its image",
    "box partly outside image": "nothing to do: the box is clipped to the image",
    "degenerate box": "nothing to do: the annotation is dropped (its box is thinner than 1 px)",
    "empty mask": "nothing to do: the annotation is dropped (its mask covers no pixel)",
    "crowd annotation": "nothing to do: crowd regions are ignored in training (255 in the semantic map)",
    "class without annotations": "add annotations of the class to this split, or remove the class from data.classes",
    "missing semantic map": "add the PNG, or delete the folder (or set data.<split>.sem_dir: null) to derive the maps",
    "bad semantic map": "semantic PNGs are single-channel, image-sized, 0 = background, class k -> k + 1, 255 = ignore",
    "semantic map disagrees": "check the PNG: 0 = background, class k -> k + 1, 255 = ignore; or delete the folder "
    "(or set data.<split>.sem_dir: null) to derive the maps from the instances",
    "instances below the anchors": "train, test and predict at a larger data.scale (more memory and time), "
                                   "or crop / tile the photos so the leaks fill more of each image",
}
# A supplied semantic map may legitimately differ from the instances at their borders; beyond this share of
# its labelled pixels (labelled in either map) the difference is reported.
SEM_DISAGREE_WARN = 0.05


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" | "warning"
    kind: str  # a key of FIXES
    message: str  # names the split, the file and the annotation id


@dataclass
class Instance:
    ann_id: int
    label: int  # 0-based index into data.classes
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels, clipped to the image
    rle: dict  # compressed COCO RLE at image size
    area: int  # mask pixels


@dataclass
class ImageRecord:
    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)
    crowd: list[dict] = field(default_factory=list)  # RLEs of crowd regions: ignored pixels
    sem_path: Path | None = None  # given semantic map, None = derive from the masks
    usable: bool = True  # False when the image itself has an error (missing, unreadable, wrong size)

    def ground_truth(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The instances in original pixels: boxes (K, 4) float32, labels (K,) int64, masks (K, H, W) bool."""
        boxes = np.array([inst.box for inst in self.instances], np.float32).reshape(-1, 4)
        labels = np.array([inst.label for inst in self.instances], np.int64)
        return boxes, labels, decode_masks([inst.rle for inst in self.instances], self.height, self.width)


@dataclass
class ClassStats:
    images: int = 0
    instances: int = 0
    tiny: int = 0


@dataclass
class CocoSplit:
    """One checked split: what the dataset trains on and what the report describes."""

    name: str
    ann_file: Path
    img_dir: Path
    classes: list[str]
    sem_source: str  # human-readable: where the semantic maps come from
    records: list[ImageRecord] = field(default_factory=list)
    cat_ids: list[int] = field(default_factory=list)  # COCO category id of each label
    problems: list[Problem] = field(default_factory=list)
    coco: COCO | None = None  # pycocotools index of the json; None when the split has errors

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def negatives(self) -> int:
        return sum(1 for r in self.records if not r.instances)

    def class_stats(self) -> dict[str, ClassStats]:
        stats = {name: ClassStats() for name in self.classes}
        for record in self.records:
            for label in {inst.label for inst in record.instances}:
                stats[self.classes[label]].images += 1
            for inst in record.instances:
                stats[self.classes[inst.label]].instances += 1
                stats[self.classes[inst.label]].tiny += inst.area < SMALL_AREA
        return stats


class _Log:
    """Collects problems of one split."""

    def __init__(self, split: str, problems: list[Problem]):
        self.split, self.problems = split, problems

    def error(self, kind: str, message: str) -> None:
        self.problems.append(Problem("error", kind, f"{self.split}: {message}"))

    def warning(self, kind: str, message: str) -> None:
        self.problems.append(Problem("warning", kind, f"{self.split}: {message}"))


# ----------------------------------------------------------------------------------------------
# semantic maps


def derive_sem_map(masks: np.ndarray, labels: np.ndarray, crowd: np.ndarray | None = None) -> np.ndarray:
    """Semantic map from instance masks: 0 background, class k -> k + 1, ``SEM_IGNORE`` on crowd regions.

    masks (K, H, W) bool (K may be 0), labels (K,) 0-based, crowd (H, W) bool or None. Where instances overlap, the
    SMALLER instance wins (it would vanish under a larger one otherwise); equal areas: the later one wins.
    Instance pixels win over crowd regions: they are labelled, so not unknown.
    """
    sem = np.zeros(masks.shape[1:], np.uint8)
    if crowd is not None:
        sem[crowd] = SEM_IGNORE
    areas = masks.sum((1, 2))
    for k in np.argsort(-areas, kind="stable"):
        sem[masks[k]] = int(labels[k]) + 1
    return sem


def read_sem_map(path: Path, height: int, width: int, num_classes: int) -> np.ndarray:
    """A given semantic map, checked: (H, W) single channel, values < num_classes + 1 or 255."""
    if not path.is_file():
        raise OilleakError(f"semantic map {path} is missing; {FIXES['missing semantic map']}")
    try:
        with Image.open(path) as im:
            sem = np.array(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise OilleakError(f"cannot read semantic map {path}: {exc}") from None
    if sem.ndim != 2:
        raise OilleakError(f"semantic map {path} has {sem.shape[2]} channels; {FIXES['bad semantic map']}")
    if sem.shape != (height, width):
        raise OilleakError(
            f"semantic map {path} is {sem.shape[1]}x{sem.shape[0]} (WxH) but its image is {width}x{height}; "
            f"{FIXES['bad semantic map']}"
        )
    bad = (sem > num_classes) & (sem != SEM_IGNORE)
    if bad.any():
        values = np.unique(sem[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (" ..." if len(values) > 10 else "")
        raise OilleakError(
            f"semantic map {path} has values {shown}; with {num_classes} classes the allowed values are "
            f"0..{num_classes} and 255 ({FIXES['bad semantic map']})"
        )
    return sem.astype(np.uint8)


def decode_masks(rles: list[dict], height: int, width: int) -> np.ndarray:
    """(K, H, W) bool masks of compressed RLEs."""
    if not rles:
        return np.zeros((0, height, width), bool)
    return np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1)).astype(bool)


# ----------------------------------------------------------------------------------------------
# annotations


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def segmentation_rle(seg, height: int, width: int) -> tuple[dict | None, str]:
    """Compressed RLE of a COCO segmentation (polygons, compressed or uncompressed RLE), or (None, why not)."""
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) for p in seg):
            return None, "segmentation must be a list of polygons [[x1, y1, x2, y2, ...], ...]"
        for poly in seg:
            if len(poly) < 6 or len(poly) % 2 or not all(_is_number(v) for v in poly):
                return None, f"a polygon needs >= 3 points as x, y numbers, got {len(poly)} values"
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width)), ""
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [height, width]:
            return None, f"RLE size {seg['size']} differs from the image's [height, width] [{height}, {width}]"
        counts = seg["counts"]
        runs = rle_string_runs(counts) if isinstance(counts, str) else counts
        if not isinstance(runs, list) or not all(isinstance(r, int) and r >= 0 for r in runs):
            return None, "RLE counts are malformed"
        if sum(runs) != height * width:
            return None, f"RLE counts cover {sum(runs)} pixels, the image has {height * width}"
        if isinstance(counts, str):
            return {"size": [height, width], "counts": counts.encode()}, ""
        return mask_utils.frPyObjects(seg, height, width), ""
    return None, "missing segmentation" if seg is None else f"unsupported segmentation {type(seg).__name__}"


def _check_box(ann: dict, width: int, height: int, where: str, log: _Log):
    """The annotation's bbox as clipped x1, y1, x2, y2, or None when it is dropped."""
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        log.error("invalid box", f"{where}: bbox {bbox!r} is not [x, y, width, height]")
        return None
    x, y, w, h = bbox
    if w < 1 or h < 1:
        log.warning("degenerate box", f"{where}: bbox {bbox} is {w:g} x {h:g} px; dropped")
        return None
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x1 >= x2 or y1 >= y2:
        log.error("box outside image", f"{where}: bbox {bbox} lies outside the {width}x{height} image")
        return None
    overhang = max(-x, -y, x + w - width, y + h - height)
    if overhang > BOX_TOLERANCE:
        log.warning("box partly outside image", f"{where}: bbox {bbox} overhangs the {width}x{height} image by {overhang:.1f} px; clipped")
    if x2 - x1 < 1 or y2 - y1 < 1:
        log.warning("degenerate box", f"{where}: bbox {bbox} is thinner than 1 px inside the image; dropped")
        return None
    return float(x1), float(y1), float(x2), float(y2)


# ----------------------------------------------------------------------------------------------
# images


def image_size(path: Path, decode: bool) -> tuple[int, int]:
    """(width, height) of the upright image (EXIF orientation applied); decode=True reads every pixel, which
    also finds truncated files."""
    with Image.open(path) as im:
        if decode:
            im.load()
        width, height = im.size
        if im.getexif().get(EXIF_ORIENTATION) in SWAPPING_ORIENTATIONS:
            width, height = height, width
    return width, height


def _read_json(ann_file: Path, log: _Log) -> dict | None:
    if not ann_file.is_file():
        log.error("annotation file", f"annotation file {ann_file} does not exist")
        return None
    try:
        data = json.loads(ann_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.error("annotation file", f"{ann_file} is not valid JSON: {exc}")
        return None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        log.error("annotation file", f"{ann_file} must be a COCO object with 'images', 'annotations' and 'categories' lists")
        return None
    return data


def _valid_images(data: dict, ann_file: Path, img_dir: Path, log: _Log) -> dict[int, ImageRecord]:
    records: dict[int, ImageRecord] = {}
    names: dict[str, int] = {}  # by normalised path: "a.jpg" and "sub/../a.jpg" are one file
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            log.error("invalid image entry", f"images[{i}] is {str(img)[:60]}, not an object")
            continue
        iid, name = img.get("id"), img.get("file_name")
        w, h = img.get("width"), img.get("height")
        if not isinstance(iid, int) or not isinstance(name, str) or not name:
            log.error("invalid image entry", f"images[{i}] {str(img)[:120]}: needs an integer id and a file_name")
            continue
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            log.error("invalid image entry", f"{name} (image id {iid}): width/height {w!r}/{h!r} are not positive integers")
            continue
        if iid in records:
            log.error("duplicate image", f"{name}: image id {iid} is also used by {records[iid].file_name}")
            continue
        if (key := posixpath.normpath(name.replace("\\", "/"))) in names:
            log.error("duplicate image", f"{name} is listed twice (image ids {names[key]} and {iid})")
            continue
        names[key] = iid
        records[iid] = ImageRecord(iid, name, img_dir / name, w, h)
        if (why := escape_reason(name)) is not None:  # kept, with its annotations, but never opened or written
            log.error("image path outside the image folder", f"{ann_file}: images[{i}] (image id {iid}) file_name "
                      f"{name!r} {why}, outside the image folder {img_dir}")
            records[iid].usable = False
    return records


def _check_image_files(records: list[ImageRecord], decode: bool, log: _Log) -> None:
    for record in (r for r in records if r.usable):
        if not record.path.is_file():
            log.error("missing image file", f"{record.path} (image id {record.image_id}) does not exist")
            record.usable = False
            continue
        try:
            width, height = image_size(record.path, decode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            log.error("unreadable image", f"{record.path} (image id {record.image_id}): {exc}")
            record.usable = False
            continue
        if (width, height) != (record.width, record.height):
            log.error(
                "image size mismatch",
                f"{record.path} (image id {record.image_id}) is {width}x{height} (WxH, after EXIF rotation) "
                f"but the json says {record.width}x{record.height}",
            )
            record.usable = False


def _check_sem_maps(records: list[ImageRecord], sem_dir: Path, num_classes: int, decode: bool, log: _Log) -> None:
    for record in records:
        record.sem_path = sem_dir / (Path(record.file_name).stem + ".png")
        if not record.sem_path.is_file():
            log.error("missing semantic map", f"{record.sem_path} for image {record.file_name} does not exist")
            continue
        try:
            if decode:
                _compare_with_instances(record, read_sem_map(record.sem_path, record.height, record.width, num_classes), log)
            else:
                with Image.open(record.sem_path) as im:
                    if im.size != (record.width, record.height):
                        raise OilleakError(
                            f"semantic map {record.sem_path} is {im.size[0]}x{im.size[1]} (WxH) but its image is "
                            f"{record.width}x{record.height}"
                        )
        except OilleakError as exc:
            log.error("bad semantic map", str(exc))
        except (OSError, ValueError, SyntaxError) as exc:
            log.error("bad semantic map", f"cannot read {record.sem_path}: {exc}")


def _compare_with_instances(record: ImageRecord, sem: np.ndarray, log: _Log) -> None:
    """Warn when a supplied map disagrees with the one the instances give (a binary 0/255 map passes the
    value check but makes every stain 'ignore')."""
    _, labels, masks = record.ground_truth()
    crowd = decode_masks(record.crowd, record.height, record.width).any(0) if record.crowd else None
    derived = derive_sem_map(masks, labels, crowd)
    labelled = (sem != 0) | (derived != 0)
    disagree = labelled & (sem != derived)
    share = disagree.sum() / max(int(labelled.sum()), 1)
    if share <= SEM_DISAGREE_WARN:
        return
    values, counts = np.unique(np.stack([sem[disagree], derived[disagree]], 1), axis=0, return_counts=True)
    given, expected = values[np.argmax(counts)]
    hint = " (it looks like a binary 0/255 mask: every stain becomes 'ignore')" if set(np.unique(sem)) <= {0, SEM_IGNORE} else ""
    log.warning(
        "semantic map disagrees",
        f"{record.sem_path} disagrees with the instance annotations of {record.file_name} on {100 * share:.1f}% of "
        f"its labelled pixels ({int(disagree.sum())} of {int(labelled.sum())}; mostly {int(given)} where the "
        f"instances give {int(expected)}){hint}",
    )


# ----------------------------------------------------------------------------------------------
# a split


def _valid_categories(data: dict, ann_file: Path, log: _Log) -> list[dict] | None:
    cats = data["categories"]
    if not all(isinstance(c, dict) and isinstance(c.get("id"), int) and isinstance(c.get("name"), str) for c in cats):
        log.error("annotation file", f"{ann_file}: every categories[] entry needs an integer id and a name")
        return None
    for key in ("id", "name"):
        dupes = sorted({str(c[key]) for c in cats if sum(d[key] == c[key] for d in cats) > 1})
        if dupes:
            log.error("annotation file", f"{ann_file}: category {key}s {dupes} are used more than once; make them unique")
            return None
    return cats


def _add_annotations(data: dict, records: dict[int, ImageRecord], cat_to_label: dict[int, int],
                     json_cat_ids: set[int], log: _Log) -> None:
    seen_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            log.error("invalid annotation", f"annotations[{i}] is {str(ann)[:60]}, not an object")
            continue
        aid, iid, cid = ann.get("id"), ann.get("image_id"), ann.get("category_id")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (aid, iid, cid)):
            log.error("invalid annotation", f"annotations[{i}] {str(ann)[:120]}: needs integer id, image_id, category_id")
            continue
        if aid in seen_ids:
            log.error("invalid annotation", f"annotation id {aid} is used more than once")
            continue
        seen_ids.add(aid)
        record = records.get(iid)
        if record is None:
            log.error("missing image id", f"annotation id {aid} refers to image id {iid}, which is not in images[]")
            continue
        where = f"{record.file_name} (annotation id {aid})"
        if cid not in json_cat_ids:
            log.error("unknown category id", f"{where}: category_id {cid} is not in categories[]")
            continue
        if cid not in cat_to_label:
            continue  # a category that is not a config class: reported by the class check
        rle, why = segmentation_rle(ann.get("segmentation"), record.height, record.width)
        if rle is None:
            log.error("invalid segmentation", f"{where}: {why}")
            continue
        if ann.get("iscrowd", 0):
            log.warning("crowd annotation", f"{where}: iscrowd=1, ignored in training")
            record.crowd.append(rle)
            continue
        box = _check_box(ann, record.width, record.height, where, log)
        if box is None:
            continue
        area = int(mask_utils.area(rle))
        if area == 0:
            log.warning("empty mask", f"{where}: the segmentation covers no pixel; dropped")
            continue
        record.instances.append(Instance(aid, cat_to_label[cid], box, rle, area))


def _check_instance_sizes(records: list[ImageRecord], scale: tuple[int, int], ann_file: Path, log: _Log) -> None:
    """Warn when many boxes are smaller than the smallest anchors once the image is resized to ``scale``."""
    from oilleak.data.transforms import rescale_size

    small = total = 0
    for record in records:
        factor = rescale_size(record.width, record.height, scale)[0] / record.width
        for inst in record.instances:
            x1, y1, x2, y2 = inst.box
            total += 1
            small += ((x2 - x1) * (y2 - y1)) ** 0.5 * factor < SMALLEST_ANCHOR
    if total and small / total >= BELOW_ANCHORS_WARN:
        long_side, short_side = max(scale), min(scale)
        log.warning("instances below the anchors", (
            f"{small} of {total} instances ({100 * small / total:.0f}%) in {ann_file} are smaller than "
            f"{SMALLEST_ANCHOR}x{SMALLEST_ANCHOR} px at data.scale [{long_side}, {short_side}] (the images are "
            f"resized to it), below the smallest anchors: the detector will find few of them; e.g. "
            f"--set data.scale=[{2 * long_side},{2 * short_side}] doubles their size"))


def _index(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def load_split(data_cfg: DataConfig, split: str, decode_images: bool = False,
               config_name: str = "your config") -> CocoSplit:
    """Load and check one split. ``decode_images=True`` reads every pixel of every image and semantic map
    (finds truncated files and bad semantic values); otherwise only headers are read."""
    cfg = data_cfg.split(split)
    root = data_cfg.root()
    ann_file, img_dir = root / cfg.ann_file, root / cfg.img_dir
    sem_dir = root / cfg.sem_dir if cfg.sem_dir else None
    if sem_dir is not None and sem_dir.is_dir():
        sem_source = f"given, read from {sem_dir}"
    else:
        absent = f" ({sem_dir} does not exist)" if sem_dir is not None else ""
        sem_source = f"derived from the instance masks{absent}"
        sem_dir = None
    out = CocoSplit(split, ann_file, img_dir, list(data_cfg.classes), sem_source)
    log = _Log(split, out.problems)

    if split == "val" and not ann_file.exists():
        # training runs without a validation split (no evaluation, no best checkpoint), so only warn
        log.warning("no validation split", f"{ann_file} does not exist: training will not evaluate (no best.pth)")
        return out
    data = _read_json(ann_file, log)
    if data is None:
        return out
    categories = _valid_categories(data, ann_file, log)
    records = _valid_images(data, ann_file, img_dir, log)
    if not data["images"]:
        if split == "val":  # `oilleak convert --val-fraction 0` writes it so: like a missing val split
            log.warning("no validation split", f"{ann_file} lists no images: training will not evaluate (no best.pth)")
        else:
            log.error("empty split", f"{ann_file} lists no images")
    if categories is None:
        return out
    ann_counts = Counter(
        a["category_id"] for a in data["annotations"]
        if isinstance(a, dict) and isinstance(a.get("category_id"), int) and not a.get("iscrowd", 0)
    )
    cat_to_label, message = match_classes(out.classes, categories, ann_counts, ann_file, config_name)
    if cat_to_label is None:
        log.error("class names", message)
        cat_to_label = {}
    else:
        out.cat_ids = sorted(cat_to_label, key=cat_to_label.get)
    _add_annotations(data, records, cat_to_label, {c["id"] for c in categories}, log)
    out.records = list(records.values())

    if out.records and not img_dir.is_dir():
        log.error("image folder", f"image folder {img_dir} does not exist")
        for record in out.records:
            record.usable = False
    else:
        _check_image_files(out.records, decode_images, log)
    if sem_dir is not None:
        _check_sem_maps(out.records, sem_dir, len(out.classes), decode_images, log)
    if out.cat_ids and out.records:
        for name, stats in out.class_stats().items():
            if stats.instances == 0:
                log.warning("class without annotations", f"class '{name}' has no usable annotation in {ann_file}")
        _check_instance_sizes(out.records, tuple(data_cfg.scale), ann_file, log)
    if out.ok:
        out.coco = _index(data)
    return out
