"""`oilleak check` through typer's CliRunner: exit codes, the report, the gallery, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_data_layout import data_config, sample_root  # noqa: F401
from typer.testing import CliRunner

from oilleak.cli import app
from oilleak.data.coco import load_split
from oilleak.data.transforms import load_image


def write_config(path: Path, data_root: Path, classes: list[str]) -> Path:
    path.write_text(yaml.safe_dump({"data": {"data_root": str(data_root), "classes": classes}}), encoding="utf-8")
    return path


def run(*args: str):
    result = CliRunner().invoke(app, ["check", *args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_check_clean_sample(tmp_path, sample_root):
    result = run(str(write_config(tmp_path / "c.yaml", sample_root, ["Pitting"])))
    assert result.exit_code == 0, result.output
    assert "train: " in result.output and "val: " in result.output
    assert "images 7, negatives (no instance) 0" in result.output
    assert "semantic maps: derived from the instance masks" in result.output
    # the sample's pitting is small: at the default scale, 4 of the 10 train instances are below the anchors
    text = " ".join(result.output.split())
    assert "the dataset is usable, 2 warning(s)" in text
    assert "warning: instances below the anchors (2); fix: train, test and predict at a larger data.scale" in text
    assert "train: 4 of 10 instances (40%)" in text and "smaller than 32x32 px at data.scale [1333, 800]" in text


def test_check_class_mismatch_exits_2_with_the_fix(tmp_path, sample_root):
    config = write_config(tmp_path / "oilleak.yaml", sample_root, ["sly_bjbmyw", "sly_dmyw"])
    result = run(str(config))
    assert result.exit_code == 2
    assert f"the class names in {config} do not match" in result.output
    assert "classes: [Pitting]" in result.output and "the dataset is NOT usable" in result.output
    fixed = run(str(config), "--set", "data.classes=[Pitting]")
    assert fixed.exit_code == 0, fixed.output


def test_check_bad_config_and_missing_data(tmp_path):
    missing = run(str(tmp_path / "nope.yaml"))
    assert missing.exit_code == 2 and "does not exist" in missing.output
    result = run(str(write_config(tmp_path / "c.yaml", tmp_path / "no_data", ["oil"])))
    assert result.exit_code == 2 and "annotation file" in result.output and "does not exist" in result.output


def test_gallery_writes_once_and_never_overwrites(tmp_path, sample_root):
    config = write_config(tmp_path / "c.yaml", sample_root, ["Pitting"])
    gallery = tmp_path / "gallery"
    result = run(str(config), "--gallery", str(gallery))
    assert result.exit_code == 0, result.output
    files = sorted(gallery.iterdir())
    assert len(files) == 4 + 3 and f"gallery: 7 images written to {gallery}" in result.output
    assert {f.name.split("_")[0] for f in files} == {"train", "val"}
    # the drawing differs from the original image inside the ground-truth boxes, barely (JPEG) elsewhere
    split = load_split(data_config(sample_root, ["Pitting"]), "train")
    for drawn in (f for f in files if f.name.startswith("train_")):
        record = next(r for r in split.records if r.file_name == drawn.name.removeprefix("train_"))
        original = load_image(record.path).astype(int)
        with Image.open(drawn) as im:
            diff = np.abs(np.asarray(im).astype(int) - original).sum(2)
        inside = np.zeros(diff.shape, bool)
        for inst in record.instances:
            x1, y1, x2, y2 = (int(v) for v in inst.box)
            inside[max(y1 - 16, 0) : y2 + 4, max(x1 - 4, 0) : x2 + 4] = True  # box, caption above it
        assert diff[inside].mean() > 30 and diff[~inside].mean() < 5
    before = {f: f.stat().st_mtime_ns for f in files}
    again = run(str(config), "--gallery", str(gallery))
    assert again.exit_code == 2 and "gallery files already exist" in again.output
    assert {f: f.stat().st_mtime_ns for f in gallery.iterdir()} == before


@pytest.mark.parametrize("broken", ["image", "annotation"])
def test_check_broken_data_exits_2(tmp_path, sample_root, broken):
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    if broken == "image":
        next((root / "val").iterdir()).write_bytes(b"\xff\xd8 broken jpeg")
        expected = "error: unreadable image (1)"
    else:
        ann_file = root / "annotations" / "train.json"
        coco = json.loads(ann_file.read_text())
        coco["annotations"][0]["bbox"] = [5000, 5000, 10, 10]
        ann_file.write_text(json.dumps(coco))
        expected = "error: box outside image (1)"
    result = run(str(write_config(tmp_path / "c.yaml", root, ["Pitting"])))
    assert result.exit_code == 2 and expected in result.output, result.output


def test_all_in_train_conversion_checks_clean(tmp_path, sample_dir):
    # convert's own --val-fraction 0 (val.json without images) must give a dataset that trains, unevaluated
    converted = CliRunner().invoke(app, ["convert", str(sample_dir), str(tmp_path / "data"), "--val-fraction", "0"])
    assert converted.exit_code == 0, converted.output
    result = run(str(write_config(tmp_path / "c.yaml", tmp_path / "data", ["Pitting"])))
    assert result.exit_code == 0, result.output
    assert "warning: no validation split (1)" in result.output and "the dataset is usable" in result.output


def test_startup_error_is_printed_verbatim(monkeypatch, tmp_path):
    # the torchvision check runs before every command; its message quotes an exception, [brackets] included
    import oilleak.deps
    from oilleak.errors import OilleakError

    def broken():
        raise OilleakError("torchvision's compiled ops cannot load (OSError: libc10.so in [/opt/venv/lib/torch])")

    monkeypatch.setattr(oilleak.deps, "require_torchvision_ops", broken)
    result = run(str(tmp_path / "c.yaml"))  # rich would read "[/opt...]" as a closing tag: MarkupError
    assert result.exit_code == 2 and "libc10.so in [/opt/venv/lib/torch]" in result.output


def test_error_from_a_loader_worker_is_shown_without_its_traceback(monkeypatch, tmp_path):
    # an image unreadable when a DataLoader worker loads it: torch re-raises the OilleakError in the main
    # process with the worker's traceback as its text; the command shows only the message
    import oilleak.data.check
    from oilleak.errors import OilleakError

    def load_in_a_worker(*args, **kwargs):
        dataset = [None]

        def unreadable(_):
            raise OilleakError("cannot read image data/val/a.jpg: image file is truncated; replace the file")

        loader = torch.utils.data.DataLoader(dataset, num_workers=1, collate_fn=unreadable)
        next(iter(loader))

    monkeypatch.setattr(oilleak.data.check, "check_dataset", load_in_a_worker)
    result = run(str(write_config(tmp_path / "c.yaml", tmp_path, ["oil"])))
    assert result.exit_code == 2, result.output
    assert "error: cannot read image data/val/a.jpg: image file is truncated; replace the file" in result.output
    assert "Original Traceback" not in result.output and "worker" not in result.output
