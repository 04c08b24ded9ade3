"""Paths from dataset files stay in their folder; nothing oilleak writes lands outside the folder the user
named or over a photo: crafted COCO and labelme files (absolute names, ``..``, symbolic links) against
`check`, `train`, `test`, `convert` and `predict`'s writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_data_layout import write_image, write_json
from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.data.labelme import convert_labelme
from oilleak.errors import OilleakError
from oilleak.evaluate.run import show_paths
from oilleak.paths import escape_reason
from oilleak.predict.files import output_file

W, H = 40, 30


@pytest.mark.parametrize(("name", "within", "why"), [
    ("a.jpg", "", None),
    ("sub/a.jpg", "", None),
    ("sub/../a.jpg", "", None),  # stays inside
    ("../photos/a.jpg", "ann", None),  # labelme: relative to its JSON in SRC/ann, still in SRC
    ("/home/me/a.jpg", "", "is an absolute path"),
    ("C:\\Users\\me\\a.jpg", "", "is an absolute path"),
    ("\\\\server\\share\\a.jpg", "", "is an absolute path"),
    ("../a.jpg", "", "climbs out of its folder with '..'"),
    ("sub/../../a.jpg", "", "climbs out of its folder with '..'"),
    ("..\\a.jpg", "", "climbs out of its folder with '..'"),
    ("../../a.jpg", "ann", "climbs out of its folder with '..'"),
    ("sub/..", "", "names the folder itself, not a file"),
])
def test_escape_reason_hand_cases(name, within, why):
    assert escape_reason(name, within) == why


def crafted_dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    """data_root whose train json lists one good image and two real images outside train/: one by its
    absolute path, one through '..'. Returns (root, the outside photo, the config)."""
    root = tmp_path / "data"
    photo = write_image(tmp_path / "photos" / "holiday.png", W, H, seed=1)
    write_image(root / "train" / "good.png", W, H)
    write_image(root / "elsewhere.png", W, H, seed=2)
    images = [("good.png", 1), (str(photo), 2), ("../elsewhere.png", 3)]
    box = [2, 2, 10, 10]
    seg = [[2, 2, 12, 2, 12, 12, 2, 12]]
    write_json(root / "annotations" / "train.json", {
        "images": [{"id": i, "file_name": n, "width": W, "height": H} for n, i in images],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "iscrowd": 0, "bbox": box, "segmentation": seg,
                         "area": 100} for _, i in images],
        "categories": [{"id": 1, "name": "oil"}],
    })
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"data_root": str(root), "classes": ["oil"], "workers": 0},
                                      "train": {"work_dir": str(tmp_path / "work")}}), encoding="utf-8")
    return root, photo, config


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_check_train_and_test_refuse_image_names_outside_the_image_folder(tmp_path):
    root, photo, config = crafted_dataset(tmp_path)
    ann = root / "annotations" / "train.json"
    check = invoke("check", str(config))
    text = " ".join(check.output.split())
    assert check.exit_code == 2 and "the dataset is NOT usable: 2 error(s)" in text
    assert f"{ann}: images[1] (image id 2) file_name '{photo}' is an absolute path" in text
    assert f"{ann}: images[2] (image id 3) file_name '../elsewhere.png' climbs out of its folder with '..'" in text
    assert "fix: put the image inside data.<split>.img_dir and give its file_name relative to that folder" in text
    assert "missing image id" not in text  # their annotations are kept with them, not reported as orphans

    train = invoke("train", str(config), "--device", "cpu", "--max-iters", "1")
    assert train.exit_code == 2 and "file_name '../elsewhere.png' climbs out" in " ".join(train.output.split())
    assert not (tmp_path / "work").exists()
    show = tmp_path / "show"
    test = invoke("test", str(config), str(tmp_path / "never-read.pth"), "--split", "train",
                  "--show-dir", str(show), "--overwrite")
    assert test.exit_code == 2 and f"file_name '{photo}' is an absolute path" in " ".join(test.output.split())
    assert not show.exists()


def test_show_dir_pictures_never_leave_it(tmp_path):
    show = tmp_path / "show"
    (tmp_path / "elsewhere").mkdir()
    show.mkdir()
    (show / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert show_paths(show, [(1, "sub/a.jpg"), (2, "b.tif")]) == {1: show / "sub" / "a.jpg", 2: show / "b.tif.png"}
    for name in ("../a.jpg", str(tmp_path / "a.jpg"), "linked/a.jpg"):
        with pytest.raises(OilleakError, match=f"--show-dir picture of '{name}'.*outside {show}"):
            show_paths(show, [(1, name)])


def test_predict_outputs_never_leave_the_output_folder(tmp_path):
    out = tmp_path / "predictions"
    (out / "overlays").mkdir(parents=True)
    assert output_file(out, "overlays", "sub/a", ".jpg") == out / "overlays" / "sub" / "a.jpg"
    (out / "instances").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(OilleakError, match="output of 'a'.*outside .*predictions.*new, empty --out-dir"):
        output_file(out, "instances", "a", ".json")


def labelme_file(folder: Path, stem: str, image_path: str, image_data: str | None = None) -> Path:
    shape = {"label": "oil", "points": [[2, 2], [12, 2], [12, 12]], "shape_type": "polygon", "group_id": None, "flags": {}}
    payload = {"shapes": [shape], "imagePath": image_path, "imageData": image_data, "imageHeight": H, "imageWidth": W}
    return write_json(folder / f"{stem}.json", payload)


def test_convert_reads_images_only_inside_src(tmp_path):
    src, out = tmp_path / "labelme", tmp_path / "out"
    photo = write_image(tmp_path / "photos" / "p.png", W, H)
    write_image(src / "ann" / "ok.png", W, H)
    labelme_file(src / "ann", "ok", "ok.png")
    labelme_file(src / "ann", "absolute", str(photo))
    labelme_file(src / "ann", "climbs", "../../photos/p.png")
    with pytest.raises(OilleakError) as caught:
        convert_labelme(src, out, ["oil"])
    message = str(caught.value)
    assert f"ann/absolute.json: imagePath '{photo}' is an absolute path, outside SRC" in message
    assert "ann/climbs.json: imagePath '../../photos/p.png' climbs out of its folder with '..', outside SRC" in message
    assert "give as SRC a folder that holds both the labelme files and their images" in message
    assert not out.exists()


def test_convert_overwrite_never_writes_through_a_link_into_src(tmp_path):
    """OUT/train a symbolic link to SRC: --overwrite would replace the photos there with their copies."""
    src, out = tmp_path / "labelme", tmp_path / "out"
    original = write_image(src / "p.png", W, H).read_bytes()
    labelme_file(src, "p", "p.png")
    out.mkdir()
    (out / "train").symlink_to(src, target_is_directory=True)
    with pytest.raises(OilleakError, match="OUT folder .*train: .*outside .*remove the link"):
        convert_labelme(src, out, ["oil"], val_fraction=0.0, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == ["p.json", "p.png"] and (src / "p.png").read_bytes() == original
    assert json.loads((src / "p.json").read_text())["imagePath"] == "p.png"
