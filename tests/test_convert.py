"""`oilleak convert`: labelme folder -> COCO layout, checked against pycocotools, PIL and hand-computed cases."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.data.labelme import convert_labelme
from oilleak.errors import OilleakError

ORIENTATION = 0x0112


# ---- helpers that build labelme folders -------------------------------------------------------------


def make_image(path: Path, width: int = 40, height: int = 30, color=(0, 0, 255), orientation: int | None = None):
    image = Image.new("RGB", (width, height), color)
    exif = Image.Exif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG" if path.suffix == ".jpg" else "PNG", exif=exif)
    return path


def shape(label: str, points, shape_type: str = "polygon", group_id=None) -> dict:
    return {"label": label, "points": points, "group_id": group_id, "shape_type": shape_type, "flags": {}}


def write_labelme(path: Path, shapes: list[dict], image_path: str, height: int, width: int, image_data=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "version": "5.4.1",
        "flags": {},
        "shapes": shapes,
        "imagePath": image_path,
        "imageData": image_data,
        "imageHeight": height,
        "imageWidth": width,
    }
    path.write_text(json.dumps(doc))
    return path


def labelled_image(folder: Path, stem: str, shapes: list[dict], width: int = 40, height: int = 30) -> Path:
    make_image(folder / f"{stem}.png", width, height)
    return write_labelme(folder / f"{stem}.json", shapes, f"{stem}.png", height, width)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def load_split(out: Path, split: str) -> dict:
    return json.loads((out / "annotations" / f"{split}.json").read_text())


def all_annotations(out: Path) -> list[tuple[str, dict, dict]]:
    """(split, image entry, annotation) for every annotation of both splits."""
    rows = []
    for split in ("train", "val"):
        coco = load_split(out, split)
        images = {im["id"]: im for im in coco["images"]}
        rows += [(split, images[a["image_id"]], a) for a in coco["annotations"]]
    return rows


def polygon_area(flat: list[float], height: int, width: int) -> int:
    return int(mask_utils.area(mask_utils.frPyObjects([flat], height, width))[0])


# ---- real labelme data: counts, areas, boxes and masks against pycocotools ----------------------------


def check_against_labelme(src: Path, out: Path) -> int:
    """Every COCO annotation equals the labelme polygon it came from; returns the number of annotations."""
    rows = all_annotations(out)
    for split, image, ann in rows:
        labelme = json.loads((src / image["labelme"]).read_text())
        assert (image["height"], image["width"]) == (labelme["imageHeight"], labelme["imageWidth"])
        with Image.open(out / split / image["file_name"]) as written:
            assert written.size == (image["width"], image["height"])
        # BSData has no group_id: one shape, one instance, polygons inside the image.
        (flat,) = ann["segmentation"]
        matching = [s for s in labelme["shapes"] if [c for p in s["points"] for c in p] == flat]
        assert len(matching) == 1, f"{image['labelme']}: annotation {ann['id']} matches no labelme shape"
        h, w = image["height"], image["width"]
        assert ann["area"] == polygon_area(flat, h, w) > 0
        xs, ys = flat[0::2], flat[1::2]
        assert ann["bbox"] == pytest.approx([min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)])
        assert ann["iscrowd"] == 0
        # Round trip through pycocotools' own reader, then against a second rasteriser: the pixels whose centre
        # lies in the labelme polygon. They differ only where an edge grazes a centre (< 0.12 px per px of
        # outline on BSData); a half-pixel shift or swapped x/y would differ by >= 0.5 px per px.
        mask = coco_of(out, split).annToMask(ann).astype(bool)
        assert mask.sum() == ann["area"]
        points = np.array(matching[0]["points"])
        outline = np.linalg.norm(np.diff(points, axis=0, append=points[:1]), axis=1).sum()
        assert (mask ^ centres_inside(points, h, w)).sum() <= 0.25 * outline
    return len(rows)


def centres_inside(points: np.ndarray, height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    inside = MplPath(points).contains_points(np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1))
    return inside.reshape(height, width)


def coco_of(out: Path, split: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        return COCO(str(out / "annotations" / f"{split}.json"))


def test_bundled_sample(sample_dir: Path, tmp_path: Path):
    out = tmp_path / "coco"
    before = tree_digest(sample_dir)
    report = convert_labelme(sample_dir, out)
    assert tree_digest(sample_dir) == before  # SRC unchanged

    labelme_files = sorted(sample_dir.glob("*.json"))
    shapes = sum(len(json.loads(p.read_text())["shapes"]) for p in labelme_files)
    assert report.classes == ["Pitting"] and report.classes_from_labels
    assert report.splits["train"].images + report.splits["val"].images == len(labelme_files) == 10
    assert report.splits["val"].images == 2  # 20% of 10
    assert report.splits["train"].instances + report.splits["val"].instances == shapes
    assert check_against_labelme(sample_dir, out) == shapes
    assert load_split(out, "train")["categories"] == [{"id": 1, "name": "Pitting", "supercategory": "Pitting"}]

    for split in ("train", "val"):
        coco = load_split(out, split)
        assert [im["id"] for im in coco["images"]] == list(range(1, len(coco["images"]) + 1))
        for image in coco["images"]:
            written = (out / split / image["file_name"]).read_bytes()
            labelme = json.loads((sample_dir / image["labelme"]).read_text())
            on_disk = sample_dir / labelme["imagePath"]
            # copied byte for byte, never re-encoded; the one embedded image is written as it was embedded
            expected = on_disk.read_bytes() if on_disk.exists() else base64.b64decode(labelme["imageData"])
            assert written == expected
    assert not (sample_dir / "01_200902053521_585000_090_crop_2.jpg").exists()  # the embedded one


def test_bsdata_subset_in_sub_folders(bsdata_dir: Path, tmp_path: Path):
    src = tmp_path / "labelme"
    jsons = sorted(bsdata_dir.glob("*.json"))[:20]
    for i, path in enumerate(jsons):
        folder = src / ("a" if i < 10 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder)
        image = bsdata_dir / json.loads(path.read_text())["imagePath"]
        if image.exists():
            shutil.copy(image, folder)
    out = tmp_path / "coco"
    report = convert_labelme(src, out, classes=["Pitting"], val_fraction=0.25, seed=3)
    shapes = sum(len(json.loads(p.read_text())["shapes"]) for p in jsons)
    assert check_against_labelme(src, out) == shapes
    assert report.splits["train"].images == 15 and report.splits["val"].images == 5
    names = [im["file_name"] for s in ("train", "val") for im in load_split(out, s)["images"]]
    # the names are unique, so each image keeps its own (no folder prefix)
    assert sorted(names) == sorted(json.loads(p.read_text())["imagePath"] for p in jsons)


# ---- classes -------------------------------------------------------------------------------------------


def test_wrong_class_names_list_labels_and_files(tmp_path: Path):
    src = tmp_path / "src"
    square = [[5, 5], [15, 5], [15, 15], [5, 15]]
    labelled_image(src, "one", [shape("oil_leak", square)])
    labelled_image(src / "sub", "two", [shape("oil_leak", square), shape("sly_dmyw", square)])
    classes = ["sly_bjbmyw", "sly_bjbmyw_dry", "sly_bjbmyw_susp", "sly_dmyw", "sly_dmyw_dry", "sly_dmyw_susp"]
    with pytest.raises(OilleakError) as error:
        convert_labelme(src, tmp_path / "out", classes=classes)
    message = str(error.value)
    assert "'oil_leak'" in message and "one.json" in message and "sub/two.json" in message
    assert "sly_dmyw' is not in" not in message  # a known label is not reported
    assert not (tmp_path / "out").exists()  # nothing written


def test_class_ids_follow_classes_or_sorted_labels(tmp_path: Path):
    src = tmp_path / "src"
    square = [[5, 5], [15, 5], [15, 15], [5, 15]]
    labelled_image(src, "img", [shape(" b_oil ", square), shape("a_oil", square)])  # labels are stripped
    convert_labelme(src, tmp_path / "sorted", val_fraction=0)
    coco = load_split(tmp_path / "sorted", "train")
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "a_oil"), (2, "b_oil")]
    assert [a["category_id"] for a in coco["annotations"]] == [2, 1]

    convert_labelme(src, tmp_path / "given", classes=["b_oil", "a_oil", "c_oil"], val_fraction=0)
    coco = load_split(tmp_path / "given", "train")
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "b_oil"), (2, "a_oil"), (3, "c_oil")]
    assert [a["category_id"] for a in coco["annotations"]] == [1, 2]


# ---- shapes --------------------------------------------------------------------------------------------


def test_group_id_parts_make_one_instance(tmp_path: Path):
    src = tmp_path / "src"
    left, right = [[2, 2], [10, 2], [10, 12], [2, 12]], [[20, 5], [30, 5], [30, 25], [20, 25]]
    lone = [[32, 2], [38, 2], [38, 8]]
    labelled_image(src, "img", [shape("oil", left, group_id=1), shape("oil", lone), shape("oil", right, group_id=1)])
    report = convert_labelme(src, tmp_path / "out", val_fraction=0)
    grouped, single = load_split(tmp_path / "out", "train")["annotations"]
    flat = [[c for p in part for c in p] for part in (left, right)]
    assert grouped["segmentation"] == flat
    # pycocotools puts an axis-aligned square (x1, y1)-(x2, y2) on (x2 - x1) * (y2 - y1) pixels
    assert grouped["area"] == 8 * 10 + 10 * 20 == polygon_area(flat[0], 30, 40) + polygon_area(flat[1], 30, 40)
    assert grouped["bbox"] == [2, 2, 28, 23]
    assert len(single["segmentation"]) == 1
    assert report.splits["train"].classes["oil"].instances == 2
    assert report.splits["train"].classes["oil"].multipart == 1


def test_group_id_shared_by_two_labels_is_an_error(tmp_path: Path):
    src = tmp_path / "src"
    square = [[5, 5], [15, 5], [15, 15], [5, 15]]
    labelled_image(src, "mixed", [shape("oil", square, group_id=4), shape("dry", square, group_id=4)])
    with pytest.raises(OilleakError, match=r"mixed\.json: group_id 4 .*dry, oil"):
        convert_labelme(src, tmp_path / "out")


def test_rectangles_and_circles_become_polygons(tmp_path: Path):
    src = tmp_path / "src"
    rectangle = shape("oil", [[12, 9], [2, 3]], "rectangle")  # corners in either order
    circle = shape("oil", [[40, 30], [40, 42]], "circle")  # centre, point on the rim: radius 12
    labelled_image(src, "img", [rectangle, circle], width=80, height=60)
    convert_labelme(src, tmp_path / "out", val_fraction=0)
    rect_ann, circle_ann = load_split(tmp_path / "out", "train")["annotations"]
    assert rect_ann["segmentation"] == [[2, 3, 12, 3, 12, 9, 2, 9]]
    assert rect_ann["area"] == 10 * 6 and rect_ann["bbox"] == [2, 3, 10, 6]
    (ring,) = circle_ann["segmentation"]
    points = list(zip(ring[0::2], ring[1::2]))
    assert len(points) >= 24
    assert all(math.hypot(x - 40, y - 30) == pytest.approx(12) for x, y in points)
    assert circle_ann["area"] == pytest.approx(math.pi * 12**2, rel=0.03)
    assert circle_ann["bbox"] == pytest.approx([28, 18, 24, 24], abs=0.01)


def test_unusable_shapes_are_skipped_with_warnings(tmp_path: Path):
    src = tmp_path / "src"
    good = [[5, 5], [15, 5], [15, 15], [5, 15]]
    shapes = [
        shape("oil", [[1, 1], [9, 9]]),  # 2-point polygon: pycocotools would read it as a box
        shape("oil", [[1, 1], [5, 5], [9, 9]]),  # collinear: zero area
        shape("oil", [[1, 1], [9, 9]], "line"),
        shape("oil", [[1, 1], [9, 9], [3, 7]], "linestrip"),
        shape("oil", [[4, 4]], "point"),
        shape("oil", [[1, 1], [9, 9]], "mask"),  # a type we do not know
        shape("oil", [[50, 50], [60, 50], [60, 60]]),  # entirely outside the 40x30 image
        shape("oil", good),
    ]
    labelled_image(src, "messy", shapes)
    labelled_image(src, "only_lines", [shape("oil", [[1, 1], [9, 9]], "line")])
    report = convert_labelme(src, tmp_path / "out", val_fraction=0)
    coco = load_split(tmp_path / "out", "train")
    assert [a["segmentation"] for a in coco["annotations"]] == [[[c for p in good for c in p]]]
    assert len(coco["images"]) == 2 and report.splits["train"].negatives == 1  # only_lines kept as a negative

    text = [str(w) for w in report.warnings]
    expected = {
        "too few points": "messy.json: shape 0 ('oil')",
        "zero area": "messy.json: shape 1 ('oil')",
        "no area": "messy.json: shape 2 ('oil')",
        "unknown shape type": "messy.json: shape 5 ('oil'): shape_type 'mask'",
    }
    for kind, start in expected.items():
        assert any(w.kind == kind and str(w).startswith(start) for w in report.warnings), (kind, text)
    assert any(t.startswith("messy.json: shape 6 ('oil')") and "outside the image" in t for t in text)
    assert sum(w.kind == "no area" for w in report.warnings) == 4  # line, linestrip, point, the negative's line


def test_points_outside_the_image_are_clipped(tmp_path: Path):
    src = tmp_path / "src"
    triangle = [[-10, 0], [20, 15], [-10, 29]]  # crosses the left border; pycocotools clips it on its own
    labelled_image(src, "img", [shape("oil", triangle)])
    report = convert_labelme(src, tmp_path / "out", val_fraction=0)
    (ann,) = load_split(tmp_path / "out", "train")["annotations"]
    (flat,) = ann["segmentation"]
    assert min(flat[0::2]) == 0 and max(flat[0::2]) == 20
    assert ann["area"] == polygon_area([c for p in triangle for c in p], 30, 40)
    assert ann["bbox"][0] == 0 and ann["bbox"][2] == 20
    assert [w.kind for w in report.warnings] == ["clipped"]


# ---- images ----------------------------------------------------------------------------------------------


def test_exif_rotation_is_baked_into_the_written_pixels(tmp_path: Path):
    # Raw pixels 40 wide, 24 high, red top rows. Orientation 6: viewers (and labelme) turn it 90 degrees
    # clockwise, so it shows 24 wide, 40 high, and the raw top rows become the right-most columns.
    src = tmp_path / "src"
    raw = Image.new("RGB", (40, 24), (0, 0, 255))
    raw.paste((255, 0, 0), (0, 0, 40, 8))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    src.mkdir()
    raw.save(src / "turned.jpg", exif=exif, quality=95)
    right_strip = [[16, 0], [24, 0], [24, 40], [16, 40]]  # labelled in the turned frame
    write_labelme(src / "turned.json", [shape("oil", right_strip)], "turned.jpg", height=40, width=24)
    convert_labelme(src, tmp_path / "out", val_fraction=0)

    coco = load_split(tmp_path / "out", "train")
    (image,), (ann,) = coco["images"], coco["annotations"]
    assert (image["width"], image["height"]) == (24, 40)
    with Image.open(tmp_path / "out" / "train" / image["file_name"]) as written:
        assert written.size == (24, 40)
        assert ORIENTATION not in written.getexif()
        pixels = np.asarray(written.convert("RGB")).astype(int)
    mask = coco_of(tmp_path / "out", "train").annToMask(ann).astype(bool)
    assert mask.sum() == 8 * 40
    red, blue = pixels[..., 0], pixels[..., 2]  # JPEG blurs colours by a pixel or so across the edge
    assert (red[mask] > blue[mask]).all() and (blue[~mask] > red[~mask]).all()


def test_size_of_the_unrotated_image_is_an_error_with_a_hint(tmp_path: Path):
    src = tmp_path / "src"
    make_image(src / "turned.jpg", 40, 24, orientation=6)
    write_labelme(src / "turned.json", [], "turned.jpg", height=24, width=40)  # the raw frame's size
    with pytest.raises(OilleakError) as error:
        convert_labelme(src, tmp_path / "out")
    message = str(error.value)
    assert "turned.json" in message and "24x40" in message and "40x24" in message
    assert "EXIF orientation (6)" in message


def test_image_size_mismatch_is_an_error(tmp_path: Path):
    src = tmp_path / "src"
    make_image(src / "img.png", 40, 30)
    write_labelme(src / "img.json", [], "img.png", height=31, width=40)
    with pytest.raises(OilleakError, match=r"img\.json: imageHeight x imageWidth is 31x40 .* is 30x40"):
        convert_labelme(src, tmp_path / "out")


def test_embedded_and_external_images_give_identical_output(tmp_path: Path):
    image_bytes = make_image(tmp_path / "image.jpg", 40, 30, color=(10, 200, 30)).read_bytes()
    shapes = [shape("oil", [[5, 5], [15, 5], [15, 15]])]
    external, embedded, both = tmp_path / "external", tmp_path / "embedded", tmp_path / "both"
    (external / "photos").mkdir(parents=True)
    (external / "photos" / "p.jpg").write_bytes(image_bytes)
    write_labelme(external / "p.json", shapes, "photos\\p.jpg", 30, 40)  # Windows separators, relative to the JSON
    write_labelme(embedded / "p.json", shapes, "p.jpg", 30, 40, base64.b64encode(image_bytes).decode())
    # both: the file on disk wins over imageData (here a different picture)
    other = io.BytesIO()
    Image.new("RGB", (40, 30), (255, 255, 255)).save(other, format="JPEG")
    (both).mkdir()
    (both / "p.jpg").write_bytes(image_bytes)
    write_labelme(both / "p.json", shapes, "p.jpg", 30, 40, base64.b64encode(other.getvalue()).decode())

    digests = []
    for src in (external, embedded, both):
        convert_labelme(src, tmp_path / f"out_{src.name}", val_fraction=0)
        digests.append(tree_digest(tmp_path / f"out_{src.name}"))
    assert digests[0] == digests[1] == digests[2]
    assert hashlib.sha256(image_bytes).hexdigest() in digests[0].values()


def test_missing_and_unreadable_images_are_reported_together(tmp_path: Path):
    src = tmp_path / "src"
    write_labelme(src / "gone.json", [], "gone.jpg", 30, 40)
    (src / "broken.jpg").write_bytes(b"not a jpeg at all")
    write_labelme(src / "broken.json", [], "broken.jpg", 30, 40)
    labelled_image(src, "fine", [])
    with pytest.raises(OilleakError) as error:
        convert_labelme(src, tmp_path / "out")
    message = str(error.value)
    assert message.startswith("2 problem(s)")
    assert "gone.json: image missing" in message and str(src / "gone.jpg") in message
    assert "broken.json: cannot read image" in message and str(src / "broken.jpg") in message
    assert not (tmp_path / "out").exists()


# ---- output folder, split, determinism ---------------------------------------------------------------


def test_unique_file_names_for_equal_stems(tmp_path: Path):
    src = tmp_path / "src"
    square = [[5, 5], [15, 5], [15, 15], [5, 15]]
    labelled_image(src / "a" / "b", "img", [shape("oil", square)])
    labelled_image(src / "c", "img", [shape("oil", square)])
    labelled_image(src / "c", "other", [shape("oil", square)])  # unique: keeps its name
    labelled_image(src / ".ipynb_checkpoints", "img-checkpoint", [shape("oil", square)])  # hidden: ignored
    convert_labelme(src, tmp_path / "out", val_fraction=0)
    images = load_split(tmp_path / "out", "train")["images"]
    assert sorted((im["file_name"], im["labelme"]) for im in images) == [
        ("a__b__img.png", "a/b/img.json"),
        ("c__img.png", "c/img.json"),
        ("other.png", "c/other.json"),
    ]
    assert sorted(p.name for p in (tmp_path / "out" / "train").iterdir()) == [
        "a__b__img.png", "c__img.png", "other.png"]


def test_overwrite_protection(tmp_path: Path, sample_dir: Path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "stale.jpg").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OilleakError, match="not empty.*--overwrite"):
        convert_labelme(sample_dir, out)
    assert (out / "train" / "stale.jpg").exists()
    convert_labelme(sample_dir, out, overwrite=True)
    assert not (out / "train" / "stale.jpg").exists()  # only convert's own folders are replaced
    assert (out / "notes.txt").read_text() == "mine"
    assert len(list((out / "train").iterdir())) == 8
    with pytest.raises(OilleakError, match="inside SRC"):
        convert_labelme(out, out / "coco")


def test_split_is_deterministic_and_src_is_untouched(tmp_path: Path, sample_dir: Path):
    src = tmp_path / "src"
    shutil.copytree(sample_dir, src)
    before = tree_digest(src)
    convert_labelme(src, tmp_path / "a", seed=7)
    convert_labelme(src, tmp_path / "b", seed=7)
    convert_labelme(src, tmp_path / "c", seed=8)
    assert tree_digest(src) == before
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")

    def val_files(out: Path) -> set[str]:
        return {im["labelme"] for im in load_split(out, "val")["images"]}

    assert len(val_files(tmp_path / "a")) == len(val_files(tmp_path / "c")) == 2
    assert val_files(tmp_path / "a") != val_files(tmp_path / "c")
    train = {im["labelme"] for im in load_split(tmp_path / "a", "train")["images"]}
    assert not train & val_files(tmp_path / "a") and len(train) == 8

    report = convert_labelme(src, tmp_path / "all_train", val_fraction=0)
    assert report.splits["train"].images == 10
    assert load_split(tmp_path / "all_train", "val")["images"] == []
    assert list((tmp_path / "all_train" / "val").iterdir()) == []


# ---- the command ---------------------------------------------------------------------------------------


def test_cli_exit_codes(tmp_path: Path, sample_dir: Path):
    runner = CliRunner()
    ok = runner.invoke(app, ["convert", str(sample_dir), str(tmp_path / "out"), "--val-fraction", "0"])
    assert ok.exit_code == 0, ok.output
    assert "Pitting" in ok.output and "val is empty" in ok.output

    wrong = runner.invoke(app, ["convert", str(sample_dir), str(tmp_path / "o2"), "--classes", "sly_bjbmyw,sly_dmyw"])
    assert wrong.exit_code == 2
    assert "'Pitting' is not in --classes" in wrong.output and "01_200902053521_585000_090_crop_2.json" in wrong.output
    assert "Traceback" not in wrong.output

    again = runner.invoke(app, ["convert", str(sample_dir), str(tmp_path / "out")])
    assert again.exit_code == 2 and "--overwrite" in again.output
