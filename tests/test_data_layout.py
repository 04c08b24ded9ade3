"""Builders of COCO layouts for the data tests (independent of `oilleak convert`), and tests of the builders
against pycocotools and the labelme sources they read."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from oilleak.config import DataConfig


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def write_json(path: Path, content: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def data_config(root: Path, classes: list[str], **kwargs) -> DataConfig:
    return DataConfig(data_root=str(root), classes=classes, **kwargs)


def labelme_to_coco(labelme_files: list[Path], image_dir: Path, category: str = "Pitting",
                    link: bool = False) -> dict:
    """A COCO dict of labelme polygon files (one category); images written or linked into image_dir."""
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id, path in enumerate(sorted(labelme_files), start=1):
        lm = json.loads(path.read_text())
        source = path.parent / lm["imagePath"]
        target = image_dir / Path(lm["imagePath"]).name
        if source.is_file():
            if link:
                os.symlink(source.resolve(), target)
            else:
                target.write_bytes(source.read_bytes())
        else:  # labelme's embedded image
            target.write_bytes(base64.b64decode(lm["imageData"]))
        images.append({"id": image_id, "file_name": target.name, "width": lm["imageWidth"], "height": lm["imageHeight"]})
        for shape in lm["shapes"]:
            pts = np.array(shape["points"], np.float64)
            x1, y1 = pts.min(0)
            x2, y2 = pts.max(0)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": [pts.reshape(-1).tolist()], "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": float((x2 - x1) * (y2 - y1)),
            })
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": category}]}


def write_labelme_layout(root: Path, labelme_files: list[Path], val_every: int = 4, link: bool = False) -> Path:
    """data_root with annotations/{train,val}.json: every ``val_every``-th file goes to val."""
    files = sorted(labelme_files)
    splits = {"train": [f for i, f in enumerate(files) if i % val_every], "val": files[::val_every]}
    for split, members in splits.items():
        write_json(root / "annotations" / f"{split}.json", labelme_to_coco(members, root / split, link=link))
    return root


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory, sample_dir) -> Path:
    return write_labelme_layout(tmp_path_factory.mktemp("sample_coco"), list(sample_dir.glob("*.json")))


def test_sample_layout_matches_labelme(sample_root, sample_dir):
    labelme_shapes = sum(len(json.loads(p.read_text())["shapes"]) for p in sample_dir.glob("*.json"))
    train = COCO(str(sample_root / "annotations" / "train.json"))
    val = COCO(str(sample_root / "annotations" / "val.json"))
    assert len(train.imgs) + len(val.imgs) == 10
    assert len(train.anns) + len(val.anns) == labelme_shapes
    for coco, split in ((train, "train"), (val, "val")):
        for img in coco.imgs.values():
            with Image.open(sample_root / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
            for ann in coco.imgToAnns[img["id"]]:
                assert coco.annToMask(ann).sum() > 0
