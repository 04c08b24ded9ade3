"""COCO loading and checks: class matching by name, every kind of bad input, segmentation formats,
semantic maps (derived and given)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from test_data_layout import data_config, sample_root, write_image, write_json, write_labelme_layout  # noqa: F401

from oilleak.data.check import check_dataset
from oilleak.data.coco import decode_masks, derive_sem_map, load_split, read_sem_map, segmentation_rle
from oilleak.data.rle import rle_string_runs
from oilleak.data.dataset import build_dataset
from oilleak.errors import OilleakError

OIL_CLASSES = ["sly_bjbmyw", "sly_bjbmyw_dry", "sly_bjbmyw_susp", "sly_dmyw", "sly_dmyw_dry", "sly_dmyw_susp"]
W, H = 64, 48


def square(x: float, y: float, size: float) -> list[list[float]]:
    return [[x, y, x + size, y, x + size, y + size, x, y + size]]


def ann(aid: int, image_id: int, category_id: int, x: float, y: float, size: float, **extra) -> dict:
    out = {"id": aid, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
           "segmentation": square(x, y, size), "bbox": [x, y, size, size], "area": size * size}
    out.update(extra)
    return out


def base_coco() -> dict:
    """Two 64x48 images: one with three instances (classes a, b, a), one negative."""
    return {
        "images": [{"id": 1, "file_name": "one.png", "width": W, "height": H},
                   {"id": 2, "file_name": "two.png", "width": W, "height": H}],
        "annotations": [ann(10, 1, 1, 4, 4, 10), ann(11, 1, 2, 30, 20, 12), ann(12, 1, 1, 50, 2, 6)],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def make_split(root: Path, coco: dict, split: str = "train", write_images: bool = True) -> Path:
    write_json(root / "annotations" / f"{split}.json", coco)
    if write_images:
        for i, img in enumerate(coco["images"]):
            write_image(root / split / img["file_name"], img["width"], img["height"], seed=i)
    return root


def load(root: Path, classes=("a", "b"), split="train", **cfg):
    return load_split(data_config(root, list(classes), **cfg), split, decode_images=True, config_name="my.yaml")


def kinds(split) -> dict[str, str]:
    return {p.kind: p.severity for p in split.problems}


def only_problem(split, kind: str, severity: str) -> str:
    assert kinds(split) == {kind: severity}, split.problems
    return next(p.message for p in split.problems if p.kind == kind)


def test_clean_split_loads_with_labels_by_name(tmp_path):
    coco = base_coco()
    coco["categories"] = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]  # json order differs from the config
    for a, cid in zip(coco["annotations"], (3, 7, 3)):
        a["category_id"] = cid
    split = load(make_split(tmp_path, coco))
    assert split.ok and split.problems == []
    assert split.cat_ids == [3, 7]  # label 0 = 'a' = id 3, whatever the json order
    one = next(r for r in split.records if r.image_id == 1)
    assert [(i.ann_id, i.label, i.box, i.area) for i in one.instances] == [
        (10, 0, (4, 4, 14, 14), 100), (11, 1, (30, 20, 42, 32), 144), (12, 0, (50, 2, 56, 8), 36)]
    assert split.negatives == 1 and isinstance(split.coco, COCO) and len(split.coco.anns) == 3


def test_users_mmdet_class_mismatch_is_explained(tmp_path):
    coco = base_coco()
    coco["categories"] = [{"id": 1, "name": "oil"}, {"id": 2, "name": "ground"}]
    root = make_split(tmp_path, coco)
    split = load(root, OIL_CLASSES)
    message = only_problem(split, "class names", "error")
    for text in ["my.yaml", str(root / "annotations" / "train.json"), "'oil' (id 1, 2 annotations)",
                 "in the config, not in the json: ['sly_bjbmyw',", "in the json (with annotations), not in the config: ['oil', 'ground']",
                 "need at least one array to concatenate", "classes: [oil, ground]", "rename categories[].name"]:
        assert text in message
    with pytest.raises(OilleakError, match="sly_dmyw_susp"):
        build_dataset(data_config(root, OIL_CLASSES), "train", train=True)


def test_near_matches_are_pointed_out(tmp_path):
    coco = base_coco()
    coco["categories"] = [{"id": 1, "name": "Sly_Dmyw "}, {"id": 2, "name": "sly_bjbmyw_dri"}]
    message = only_problem(load(make_split(tmp_path, coco), ["sly_dmyw", "sly_bjbmyw_dry"]), "class names", "error")
    assert "'sly_dmyw' (config) and 'Sly_Dmyw ' (json) differ only in case or spaces" in message
    assert "'sly_bjbmyw_dry' (config) looks like 'sly_bjbmyw_dri' (json)" in message


def test_extra_json_category_with_annotations_is_an_error_without_is_fine(tmp_path):
    coco = base_coco()
    coco["categories"].append({"id": 3, "name": "unused"})
    assert load(make_split(tmp_path / "fine", coco)).ok
    message = only_problem(load(make_split(tmp_path / "bad", base_coco()), ["a"]), "class names", "error")
    assert "in the json (with annotations), not in the config: ['b']" in message and "'b' (id 2, 1 annotations)" in message


def test_config_class_without_annotations_is_a_warning(tmp_path):
    coco = base_coco()
    coco["categories"].append({"id": 3, "name": "c"})
    split = load(make_split(tmp_path, coco), ["a", "b", "c"])
    assert "class 'c' has no usable annotation" in only_problem(split, "class without annotations", "warning")
    assert split.ok


def test_empty_split(tmp_path):
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    assert "lists no images" in only_problem(load(make_split(tmp_path, coco)), "empty split", "error")


def test_empty_val_split_is_a_warning(tmp_path):
    # `oilleak convert --val-fraction 0` writes a val.json without images: trainable, without evaluation
    root = make_split(tmp_path, base_coco())
    make_split(root, {**base_coco(), "images": [], "annotations": []}, split="val")
    report = check_dataset(data_config(root, ["a", "b"]))
    assert report.ok and [(p.severity, p.kind) for p in report.problems] == [("warning", "no validation split")]
    assert "lists no images" in report.problems[0].message


def test_missing_or_broken_annotation_file(tmp_path):
    assert "does not exist" in only_problem(load(tmp_path), "annotation file", "error")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.json").write_text("{ not json")
    assert "is not valid JSON" in only_problem(load(tmp_path), "annotation file", "error")
    write_json(tmp_path / "annotations" / "train.json", {"images": []})
    assert "'annotations'" in only_problem(load(tmp_path), "annotation file", "error")


def test_missing_val_split_is_a_warning(tmp_path):
    report = check_dataset(data_config(make_split(tmp_path, base_coco()), ["a", "b"]))
    assert report.ok and [(p.severity, p.kind) for p in report.problems] == [("warning", "no validation split")]
    assert str(tmp_path / "annotations" / "val.json") in report.problems[0].message


def test_missing_image_file_and_folder(tmp_path):
    root = make_split(tmp_path, base_coco())
    (root / "train" / "two.png").unlink()
    message = only_problem(load(root), "missing image file", "error")
    assert str(root / "train" / "two.png") in message and "image id 2" in message
    moved = data_config(root, ["a", "b"], train={"ann_file": "annotations/train.json", "img_dir": "nope"})
    message = only_problem(load_split(moved, "train"), "image folder", "error")
    assert str(root / "nope") in message


def test_unreadable_image_and_size_mismatch(tmp_path):
    root = make_split(tmp_path, base_coco())
    (root / "train" / "one.png").write_bytes(b"garbage")
    write_image(root / "train" / "two.png", W + 1, H)
    split = load(root)
    assert kinds(split) == {"unreadable image": "error", "image size mismatch": "error"}
    messages = " ".join(p.message for p in split.problems)
    assert "one.png (image id 1)" in messages and f"two.png (image id 2) is {W + 1}x{H}" in messages and f"json says {W}x{H}" in messages


def test_entries_that_are_not_objects(tmp_path):
    coco = base_coco()
    root = make_split(tmp_path, coco)
    coco["images"].append("three.png")
    coco["annotations"].append([1, 2, 3])
    coco["annotations"].append(ann(13, 1, [1], 4, 4, 10))
    split = load(make_split(root, coco, write_images=False))
    assert kinds(split) == {"invalid image entry": "error", "invalid annotation": "error"}
    assert len(split.problems) == 3 and "images[2] is three.png, not an object" in split.problems[0].message


def test_duplicate_image_ids_and_file_names(tmp_path):
    coco = base_coco()
    coco["images"].append({"id": 1, "file_name": "three.png", "width": W, "height": H})
    coco["images"].append({"id": 4, "file_name": "two.png", "width": W, "height": H})
    split = load(make_split(tmp_path, coco))
    messages = [p.message for p in split.problems if p.kind == "duplicate image"]
    assert len(messages) == 2 and not split.ok
    assert "image id 1 is also used by one.png" in messages[0] and "two.png is listed twice (image ids 2 and 4)" in messages[1]


def test_boxes_outside_partly_outside_and_degenerate(tmp_path):
    coco = base_coco()
    coco["annotations"] = [
        ann(20, 1, 1, 100, 100, 10),  # entirely outside the 64x48 image
        ann(21, 1, 1, 58, 40, 12),  # overhangs right and bottom by 6 / 4 px
        ann(22, 1, 1, 10, 10, 0.5),  # thinner than a pixel
        ann(23, 1, 2, 10, 20, 5),
    ]
    split = load(make_split(tmp_path, coco))
    assert kinds(split) == {"box outside image": "error", "box partly outside image": "warning", "degenerate box": "warning"}
    messages = {p.kind: p.message for p in split.problems}
    assert "one.png (annotation id 20)" in messages["box outside image"]
    assert "one.png (annotation id 21)" in messages["box partly outside image"] and "by 6.0 px; clipped" in messages["box partly outside image"]
    assert "one.png (annotation id 22)" in messages["degenerate box"] and "dropped" in messages["degenerate box"]
    one = next(r for r in split.records if r.image_id == 1)
    assert [(i.ann_id, i.box) for i in one.instances] == [(21, (58, 40, 64, 48)), (23, (10, 20, 15, 25))]


def test_empty_mask_is_dropped(tmp_path):
    coco = base_coco()
    coco["annotations"][0]["segmentation"] = [[4, 4, 14, 4, 24, 4]]  # three points on a line: no area
    split = load(make_split(tmp_path, coco))
    assert "one.png (annotation id 10)" in only_problem(split, "empty mask", "warning")
    assert [i.ann_id for r in split.records for i in r.instances] == [11, 12]


@pytest.mark.parametrize(
    "field, value, kind, text",
    [
        ("category_id", 9, "unknown category id", "category_id 9 is not in categories[]"),
        ("image_id", 99, "missing image id", "annotation id 10 refers to image id 99"),
        ("segmentation", None, "invalid segmentation", "missing segmentation"),
        ("segmentation", [[1, 2, 3, 4]], "invalid segmentation", ">= 3 points"),
        ("segmentation", [1, 2, 3, 4, 5, 6], "invalid segmentation", "list of polygons"),
        ("segmentation", {"size": [10, 10], "counts": [100]}, "invalid segmentation", "RLE size [10, 10]"),
        ("segmentation", {"size": [H, W], "counts": [5, 3]}, "invalid segmentation", f"cover 8 pixels, the image has {H * W}"),
        ("segmentation", {"size": [H, W], "counts": "\x01\x02"}, "invalid segmentation", "malformed"),
        ("bbox", [1, 2, 3], "invalid box", "is not [x, y, width, height]"),
        ("id", "x", "invalid annotation", "needs integer id"),
    ],
)
def test_bad_annotations(tmp_path, field, value, kind, text):
    coco = base_coco()
    coco["annotations"][0][field] = value
    message = only_problem(load(make_split(tmp_path, coco)), kind, "error")
    assert text in message


def test_crowd_annotations_are_ignored_and_marked_in_the_sem_map(tmp_path):
    coco = base_coco()
    coco["annotations"][2] = ann(12, 1, 1, 40, 2, 8, iscrowd=1)
    split = load(make_split(tmp_path, coco))
    assert "one.png (annotation id 12): iscrowd=1" in only_problem(split, "crowd annotation", "warning")
    one = next(r for r in split.records if r.image_id == 1)
    assert [i.ann_id for i in one.instances] == [10, 11] and len(one.crowd) == 1
    dataset = build_dataset(data_config(split.ann_file.parents[1], ["a", "b"], flip_prob=0.0, scale=(W, H)), "train", train=True)
    sem = dataset[dataset.image_ids.index(1)].targets.sem_seg
    assert (sem[2:10, 40:48] == 255).all() and (sem[4:14, 4:14] == 1).all() and (sem[20:32, 30:42] == 2).all()
    assert int((sem == 255).sum()) == 64 and int((sem == 0).sum()) == W * H - 64 - 100 - 144


def test_segmentation_formats_decode_like_pycocotools(tmp_path):
    """Polygon, uncompressed RLE and compressed RLE of the same shape give the same mask as pycocotools'
    own annToMask."""
    poly = [[5.5, 3.0, 40.2, 10.0, 22.0, 40.7]]
    dense = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, H, W)))
    compressed = mask_utils.encode(np.asfortranarray(dense))
    flat = dense.reshape(-1, order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    uncompressed = {"size": [H, W], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    coco = base_coco()
    coco["annotations"] = [
        ann(1, 1, 1, 5, 3, 37, segmentation=poly),
        ann(2, 1, 1, 5, 3, 37, segmentation=uncompressed),
        ann(3, 1, 1, 5, 3, 37, segmentation={"size": [H, W], "counts": compressed["counts"].decode()}),
    ]
    split = load(make_split(tmp_path, coco))
    assert split.ok, split.problems
    truth = COCO(str(split.ann_file))
    masks = decode_masks([i.rle for i in split.records[0].instances], H, W)
    for mask, aid in zip(masks, (1, 2, 3)):
        assert np.array_equal(mask, truth.annToMask(truth.anns[aid]).astype(bool))
    assert np.array_equal(masks[0], dense.astype(bool)) and dense.sum() > 300


def test_rle_string_counts_match_the_run_lengths():
    rng = np.random.default_rng(1)
    mask = np.zeros((37, 53), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 30), rng.integers(0, 45)
        mask[y : y + rng.integers(1, 8), x : x + rng.integers(1, 9)] = 1
    flat = mask.reshape(-1, order="F")
    runs, value, count = [], 0, 0
    for v in flat:  # runs alternate 0s and 1s, starting with 0s
        if v != value:
            runs.append(count)
            value, count = v, 0
        count += 1
    runs.append(count)
    counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
    assert rle_string_runs(counts) == runs
    assert rle_string_runs("\x7f") is None


def test_derive_sem_map_smaller_instance_wins_and_crowd_is_ignored():
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 0:8, 0:8] = True  # large, class 0
    masks[1, 2:5, 2:5] = True  # small, class 2, inside the large one
    masks[2, 6:9, 6:11] = True  # medium, class 1, overlapping the large one's corner
    crowd = np.zeros((10, 12), bool)
    crowd[8:10, 0:12] = True
    labels = np.array([0, 2, 1])
    expected = np.zeros((10, 12), np.uint8)
    expected[8:10, :] = 255
    expected[0:8, 0:8] = 1
    expected[6:9, 6:11] = 2  # smaller than the large square: wins the overlap, also over the crowd row 8
    expected[2:5, 2:5] = 3
    for order in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        assert np.array_equal(derive_sem_map(masks[order], labels[order], crowd), expected)
    assert np.array_equal(derive_sem_map(np.zeros((0, 4, 5), bool), np.zeros(0, np.int64)), np.zeros((4, 5), np.uint8))


def _sem_png(path: Path, array: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path) if mode != "L" else Image.fromarray(array).save(path)


def test_given_semantic_maps_are_used(tmp_path):
    root = make_split(tmp_path, base_coco())
    given = np.zeros((H, W), np.uint8)
    given[:10, :] = 2
    given[40:, :5] = 255
    _sem_png(root / "train_mask" / "one.png", given)
    _sem_png(root / "train_mask" / "two.png", np.ones((H, W), np.uint8))
    split = load(root)
    assert split.ok and split.sem_source.startswith("given, read from") and split.records[0].sem_path.name == "one.png"
    dataset = build_dataset(data_config(root, ["a", "b"], flip_prob=0.0, scale=(W * 2, H * 2)), "train", train=True)
    sem = dataset[dataset.image_ids.index(1)].targets.sem_seg
    assert np.array_equal(sem.numpy(), np.repeat(np.repeat(given, 2, 0), 2, 1))  # nearest, scale 2


def test_semantic_map_problems(tmp_path):
    root = make_split(tmp_path, base_coco())
    bad = np.zeros((H, W), np.uint8)
    bad[0, 0], bad[1, 1] = 3, 7  # 2 classes: only 0, 1, 2 and 255 are allowed
    _sem_png(root / "train_mask" / "one.png", bad)
    split = load(root)
    assert kinds(split) == {"bad semantic map": "error", "missing semantic map": "error"}
    messages = {p.kind: p.message for p in split.problems}
    assert "one.png has values 3, 7" in messages["bad semantic map"] and "0..2 and 255" in messages["bad semantic map"]
    assert str(root / "train_mask" / "two.png") in messages["missing semantic map"]
    _sem_png(root / "train_mask" / "two.png", np.zeros((H - 1, W), np.uint8))
    with pytest.raises(OilleakError, match=f"two.png is {W}x{H - 1}"):
        read_sem_map(root / "train_mask" / "two.png", H, W, 2)
    _sem_png(root / "train_mask" / "two.png", np.zeros((H, W, 3), np.uint8), mode="RGB")
    with pytest.raises(OilleakError, match="3 channels"):
        read_sem_map(root / "train_mask" / "two.png", H, W, 2)


def test_sem_dir_absent_means_derived(tmp_path):
    split = load(make_split(tmp_path, base_coco()))
    assert split.sem_source == f"derived from the instance masks ({tmp_path / 'train_mask'} does not exist)"
    assert all(r.sem_path is None for r in split.records)


def test_segmentation_rle_rejects_non_segmentations():
    assert segmentation_rle("abc", H, W) == (None, "unsupported segmentation str")
    assert segmentation_rle([], H, W)[0] is None


def test_report_groups_and_truncates(tmp_path):
    coco = base_coco()
    coco["images"] = [{"id": i, "file_name": f"img{i}.png", "width": W, "height": H} for i in range(1, 9)]
    coco["annotations"] = [ann(i, i, 1 + i % 2, 4, 4, 10) for i in range(1, 9)]
    root = make_split(tmp_path, coco, write_images=False)
    (root / "train").mkdir()
    make_split(root, copy.deepcopy(coco), split="val")
    report = check_dataset(data_config(root, ["a", "b"]), config_name="my.yaml")
    assert not report.ok and len(report.errors) == 8 and report.splits["val"].ok
    text = report.format(max_shown=3)
    assert "error: missing image file (8); fix: copy the image" in text
    assert text.count("does not exist") == 3 + 2 and "... and 5 more" in text  # + the two sem_dir notes
    assert "the dataset is NOT usable: 8 error(s)" in text
    with pytest.raises(OilleakError, match=r"img5.png \(image id 5\) does not exist\n  ... and 3 more"):
        report.raise_if_failed()


def test_sample_and_bsdata_check_clean(sample_root, bsdata_dir, tmp_path):
    report = check_dataset(data_config(sample_root, ["Pitting"]))
    assert report.ok and {p.kind for p in report.problems} == {"instances below the anchors"}  # small pitting
    stats = {s: report.splits[s].class_stats()["Pitting"] for s in ("train", "val")}
    assert stats["train"].instances + stats["val"].instances == 14 and len(report.splits["train"].records) == 7
    bs_root = write_labelme_layout(tmp_path / "bs", list(bsdata_dir.glob("*.json")), link=True)
    report = check_dataset(data_config(bs_root, ["Pitting"]))
    assert report.ok, report.format()
    assert sum(len(s.records) for s in report.splits.values()) == 324
    assert sum(s.class_stats()["Pitting"].instances for s in report.splits.values()) == 397
    dataset = build_dataset(data_config(bs_root, ["Pitting"]), "val", train=True)
    largest = max(range(len(dataset)), key=lambda i: dataset.records[i].width)
    record, sample = dataset.records[largest], dataset[largest]
    assert record.width > 2000 and sample.image.shape[2] == 1333 and sample.meta.ori_shape == (record.height, record.width)
    assert sample.targets.masks.shape == (len(record.instances), *sample.image.shape[1:])



def test_supplied_semantic_map_that_disagrees_with_the_instances_is_warned(tmp_path):
    """A binary 0/255 map passes the value check but would make every stain 'ignore': check names the file
    and the share of disagreeing pixels; the map the instances give draws no warning."""
    root = make_split(tmp_path, base_coco())
    split = load(root)  # no train_mask folder yet: the maps are derived
    derived = {}
    for record in split.records:
        _, labels, masks = record.ground_truth()
        crowd = decode_masks(record.crowd, record.height, record.width).any(0) if record.crowd else None
        derived[Path(record.file_name).stem] = derive_sem_map(masks, labels, crowd)
    for stem, sem in derived.items():
        _sem_png(root / "train_mask" / f"{stem}.png", sem)
    assert "semantic map disagrees" not in kinds(load(root))

    binary = np.where(derived["one"] > 0, 255, 0).astype(np.uint8)
    _sem_png(root / "train_mask" / "one.png", binary)
    message = only_problem(load(root), "semantic map disagrees", "warning")
    labelled = int((derived["one"] > 0).sum())
    assert str(root / "train_mask" / "one.png") in message
    assert f"on 100.0% of its labelled pixels ({labelled} of {labelled}" in message and "binary 0/255" in message


@pytest.mark.parametrize("scale, small", [((128, 96), 3), ((256, 192), 1), ((384, 288), 0), ((1333, 800), 0)])
def test_instances_below_the_smallest_anchors_at_the_scale_are_a_warning(tmp_path, scale, small):
    # 64x48 images with 10, 12 and 6 px squares: x2 at (128, 96), x4 at (256, 192), x6 at (384, 288)
    split = load(make_split(tmp_path, base_coco()), scale=scale)
    if not small:
        assert split.problems == []
        return
    message = only_problem(split, "instances below the anchors", "warning")
    assert message.startswith(f"train: {small} of 3 instances ({100 * small / 3:.0f}%) in ")
    assert f"at data.scale [{scale[0]}, {scale[1]}]" in message
    assert f"--set data.scale=[{2 * scale[0]},{2 * scale[1]}]" in message
