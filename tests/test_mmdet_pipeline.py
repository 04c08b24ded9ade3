"""oilleak's input pixels are mmdetection 3.3's: decode, keep-ratio resize with mmcv's size rounding, flip.

The reference (tests/data/mmdet_pipeline/reference.npz) is what mmdet's own LoadImageFromFile, Resize and
RandomFlip made of real JPEGs (tests/tools/mmdet_pipeline_reference.py, run with the peer's python): two BSData
photos (one shrunk 5.4-fold, where PIL's antialiasing differed by up to tens of grey levels), a portrait crop
and the same crop stored sideways with an EXIF orientation. Normalisation and padding are checked against
the parity fixtures' inputs (test_data_transforms).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from oilleak.data.transforms import load_image, normalize, prepare_image, transform_train
from oilleak.structures import Targets

DATA = Path(__file__).parent / "data" / "mmdet_pipeline"
SCALE = (500, 300)  # the reference script's
CASES = ["photo", "photo_flipped", "wide", "portrait", "exif_rotated"]


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(DATA / "reference.npz") as npz:
        return dict(npz)


def _source(name: str, reference, bsdata_dir: Path) -> Path:
    file = str(reference[f"{name}.file"])
    return DATA / file if (DATA / file).exists() else bsdata_dir / file


@pytest.mark.parametrize("name", CASES)
def test_pixels_and_meta_equal_mmdet_pipeline(name, reference, bsdata_dir):
    image = load_image(_source(name, reference, bsdata_dir))
    flip = bool(reference[f"{name}.flip"])
    if flip:
        h, w = image.shape[:2]
        empty = Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, h, w, dtype=torch.bool), torch.zeros(h, w, dtype=torch.uint8))
        tensor, meta, _ = transform_train(image, empty, SCALE, flip=True)
    else:
        tensor, meta = prepare_image(image, SCALE)
    pixels = reference[f"{name}.pixels"]
    assert meta.ori_shape == tuple(reference[f"{name}.ori_shape"][:2])
    assert meta.img_shape == tuple(reference[f"{name}.img_shape"][:2]) == pixels.shape[:2]
    assert meta.scale_factor == tuple(reference[f"{name}.scale_factor"])
    assert meta.flip == flip
    assert torch.equal(tensor, normalize(pixels))  # the same float32 arithmetic on the same pixels


def test_exif_orientation_turns_the_image_upright(reference):
    upright, sideways = load_image(DATA / "portrait.jpg"), load_image(DATA / "exif_rotated.jpg")
    assert upright.shape == sideways.shape and upright.shape[0] > upright.shape[1]
    # the same picture (both JPEG-encoded, so not bit-equal)
    assert np.abs(upright.astype(int) - sideways.astype(int)).mean() < 3
