"""Transforms: the resize rule, box / mask / semantic-map consistency under resize and flip, normalisation and
padding against mmdetection's fixture input, the inverse mapping against mmdetection's rescaled detections."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from oilleak.data.coco import image_size
from oilleak.data.transforms import (
    PhotometricDistortion,
    boxes_to_original,
    load_image,
    normalize,
    pad_batch,
    prepare_image,
    rescale_size,
    resize_nearest,
    transform_train,
)
from oilleak.errors import OilleakError
from oilleak.structures import ImageMeta, Targets
from tests.conftest import FIXTURE_NAMES


def mask_box(mask: torch.Tensor) -> list[float]:
    """Tight x1, y1, x2, y2 box of a mask's pixels (x2, y2 exclusive)."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize(
    "width, height, scale, expected",
    [
        (800, 480, (1333, 800), (1333, 800)),  # mmdet's worked example: s = min(1333/800, 800/480) = 1.66625
        (480, 800, (1333, 800), (800, 1333)),  # portrait: the long edge is the height
        (1130, 460, (1333, 800), (1333, 543)),  # BSData: s = 1333/1130, 460 * s = 542.6 -> 543
        (2793, 863, (698, 224), (698, 216)),  # the mmdet fixture: s = 698/2793, 863 * s = 215.7 -> 216
        (100, 50, (800, 1333), (1333, 667)),  # (short, long) order does not matter: s = 13.33, 50 * s = 666.5
    ],
)
def test_rescale_size(width, height, scale, expected):
    assert rescale_size(width, height, scale) == expected


def _rect_targets(height: int, width: int) -> Targets:
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    masks[0, 10:20, 20:40] = True  # box [20, 10, 40, 20]
    masks[1, 30:45, 60:65] = True  # box [60, 30, 65, 45]
    boxes = torch.tensor([[20.0, 10, 40, 20], [60, 30, 65, 45]])
    sem = torch.zeros(height, width, dtype=torch.uint8)
    sem[masks[0]] = 1
    sem[masks[1]] = 3
    return Targets(boxes, torch.tensor([0, 2]), masks, sem)


@pytest.mark.parametrize("flip", [False, True])
def test_resize_and_flip_move_boxes_masks_and_sem_together(flip):
    image = np.zeros((50, 100, 3), np.uint8)
    image[10:20, 20:40] = 255  # the first instance is white in the image too
    tensor, meta, out = transform_train(image, _rect_targets(50, 100), (200, 100), flip, image_id=5, file_name="a.jpg")
    assert tensor.shape == (3, 100, 200) and meta.img_shape == (100, 200) and meta.pad_shape == (128, 224)
    assert meta.scale_factor == (2.0, 2.0) and meta.flip is flip and meta.ori_shape == (50, 100)
    # by hand: scale 2, then x -> 200 - x with x1 and x2 swapped
    expected = [[40.0, 20, 80, 40], [120, 60, 130, 90]]
    if flip:
        expected = [[120.0, 20, 160, 40], [70, 60, 80, 90]]
    assert out.boxes.tolist() == expected
    assert [mask_box(m) for m in out.masks] == expected
    assert out.masks.dtype == torch.bool and out.masks.shape == (2, 100, 200)
    assert torch.equal(out.sem_seg == 1, out.masks[0]) and torch.equal(out.sem_seg == 3, out.masks[1])
    x1, y1, x2, y2 = (int(v) for v in expected[0])
    white, black = (255 - 123.675) / 58.395, -123.675 / 58.395
    # bilinear blurs the edges by one pixel: the inside is white, everything a pixel away from the box black
    assert torch.allclose(tensor[0, y1 + 1 : y2 - 1, x1 + 1 : x2 - 1], torch.tensor(white))
    outside = torch.ones(100, 200, dtype=torch.bool)
    outside[y1 - 1 : y2 + 1, x1 - 1 : x2 + 1] = False
    assert torch.allclose(tensor[0][outside], torch.tensor(black))


def test_real_masks_follow_their_boxes_under_resize_and_flip(sample_dir):
    """BSData polygons, resized by 1333/1130 and flipped: each transformed box is the original box mapped by
    hand, and each transformed mask's box is the original mask's box mapped by hand (within the 1 px of
    nearest-neighbour resizing)."""
    import json

    from pycocotools import mask as mask_utils

    lm = json.loads((sample_dir / "01_200905041126_277500_315_crop_2.json").read_text())
    image = load_image(sample_dir / lm["imagePath"])
    h, w = image.shape[:2]
    polys = [np.array(s["points"]).reshape(-1).tolist() for s in lm["shapes"]]
    masks = np.stack([mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([p], h, w))) for p in polys]).astype(bool)
    boxes = torch.tensor([[min(p[0::2]), min(p[1::2]), max(p[0::2]), max(p[1::2])] for p in polys], dtype=torch.float32)
    targets = Targets(boxes, torch.zeros(len(polys), dtype=torch.long), torch.from_numpy(masks), torch.zeros(h, w, dtype=torch.uint8))
    _, meta, out = transform_train(image, targets, (1333, 800), flip=True)
    sx, sy = meta.scale_factor
    new_w = meta.img_shape[1]
    assert (sx, sy) == (1333 / 1130, 543 / 460)

    def by_hand(b):
        return torch.tensor([new_w - b[2] * sx, b[1] * sy, new_w - b[0] * sx, b[3] * sy])

    for k in range(len(polys)):
        assert torch.allclose(out.boxes[k], by_hand(boxes[k].tolist()), atol=1e-3)
        assert torch.allclose(torch.tensor(mask_box(out.masks[k])), by_hand(mask_box(torch.from_numpy(masks[k]))), atol=1.0)


def test_resize_nearest_picks_source_pixel_floor():
    """cv2's (and so mmdet's) nearest: destination j reads source floor(j * src / dst)."""
    src = torch.arange(5 * 7, dtype=torch.uint8).reshape(5, 7)
    out = resize_nearest(src, (11, 8))  # to 11 wide, 8 high
    rows = np.floor(np.arange(8) * 5 / 8).astype(int)
    cols = np.floor(np.arange(11) * 7 / 11).astype(int)
    assert torch.equal(out, src[rows][:, cols])
    assert resize_nearest(torch.zeros(0, 5, 7, dtype=torch.bool), (11, 8)).shape == (0, 8, 11)


def test_prepare_image_reproduces_mmdet_fixture_input(bsdata_dir, fixtures_dir):
    """Sizes, normalisation and padding; the fixture's pixels were resized with PIL's bilinear (its README),
    oilleak's follow mmdet's OpenCV resize (test_mmdet_pipeline), so the resized pixels are PIL's here."""
    fixture = torch.load(fixtures_dir / "detectors_htc_small.pt", weights_only=True)["inputs"]
    with Image.open(bsdata_dir / fixture["image_file"]) as raw:
        image = np.array(raw.convert("RGB"))
    _, meta = prepare_image(image, (698, 224), image_id=0, file_name=fixture["image_file"])
    resized = np.array(Image.fromarray(image).resize((meta.img_shape[1], meta.img_shape[0]), Image.BILINEAR))
    batch, _ = pad_batch([normalize(resized)])
    ref = fixture["img_meta"]
    assert meta.ori_shape == tuple(ref["ori_shape"]) and meta.img_shape == tuple(ref["img_shape"])
    assert meta.pad_shape == tuple(ref["pad_shape"]) and meta.scale_factor == pytest.approx(ref["scale_factor"])
    assert batch.shape == fixture["batch_inputs"].shape
    assert torch.allclose(batch, fixture["batch_inputs"], atol=1e-5)


@pytest.mark.parametrize("fixture_name", FIXTURE_NAMES)
def test_boxes_to_original_matches_mmdet_rescaled_detections(fixtures_dir, fixture_name):
    fixture = torch.load(fixtures_dir / fixture_name, weights_only=True)
    ref = fixture["inputs"]["img_meta"]
    meta = ImageMeta(0, "", tuple(ref["ori_shape"]), tuple(ref["img_shape"]), tuple(ref["pad_shape"]), tuple(ref["scale_factor"]))
    boxes = boxes_to_original(fixture["outputs"]["dets_input_scale"]["bboxes"], meta)
    assert torch.allclose(boxes, fixture["outputs"]["dets"]["bboxes"], atol=1e-3)


@pytest.mark.parametrize("flip", [False, True])
def test_boxes_to_original_inverts_the_training_transform(flip):
    rng = np.random.default_rng(0)
    h, w = 460, 1130
    xy = rng.uniform(0, [w, h], size=(20, 2))
    wh = rng.uniform(1, 200, size=(20, 2))
    boxes = torch.tensor(np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1), dtype=torch.float32)
    targets = Targets(boxes, torch.zeros(20, dtype=torch.long), torch.zeros(20, h, w, dtype=torch.bool), torch.zeros(h, w, dtype=torch.uint8))
    _, meta, out = transform_train(np.zeros((h, w, 3), np.uint8), targets, (1333, 800), flip)
    assert not torch.allclose(out.boxes, boxes, atol=1.0)
    assert torch.allclose(boxes_to_original(out.boxes, meta), boxes, atol=1e-3)


def test_pad_batch_pads_images_with_zero_and_sem_with_255():
    a, b = torch.ones(3, 50, 70), torch.full((3, 40, 100), 2.0)
    batch, sems = pad_batch([a, b], [torch.ones(50, 70, dtype=torch.uint8), torch.zeros(40, 100, dtype=torch.uint8)])
    assert batch.shape == (2, 3, 64, 128)
    assert torch.equal(batch[0, :, :50, :70], a) and batch[0, :, 50:].abs().sum() == 0 and batch[0, :, :, 70:].abs().sum() == 0
    assert torch.equal(batch[1, :, :40, :100], b) and batch[1, :, 40:].abs().sum() == 0
    assert sems[0].shape == (64, 128) and (sems[0][:50, :70] == 1).all()
    assert (sems[0][50:] == 255).all() and (sems[0][:, 70:] == 255).all() and (sems[1][40:] == 255).all()


def _jpeg_with_orientation(path, array: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, format="PNG", exif=exif.tobytes())


def test_load_image_applies_exif_orientation(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high as stored
    stored[0, 0] = 255  # top-left corner marked
    path = tmp_path / "rotated.png"
    _jpeg_with_orientation(path, stored, 6)  # EXIF 6: display rotated 90 degrees clockwise
    loaded = load_image(path)
    assert loaded.shape == (40, 20, 3)
    assert np.array_equal(loaded, np.rot90(stored, k=-1))  # clockwise: stored top-left becomes top-right
    assert loaded[0, 19, 0] == 255
    assert image_size(path, decode=True) == (20, 40)


def test_load_image_rejects_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(OilleakError, match="garbage.jpg"):
        load_image(garbage)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(buf, format="JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(OilleakError, match="truncated.jpg"):
        load_image(truncated)
    with pytest.raises(OSError):
        image_size(truncated, decode=True)


def _distortion(**kwargs) -> PhotometricDistortion:
    values = {"brightness": None, "contrast": None, "saturation": None, "hue": None, "contrast_first": False}
    return PhotometricDistortion(**{**values, **kwargs})


def test_photometric_brightness_and_contrast_by_hand():
    grey = np.full((4, 5, 3), 100, np.uint8)
    assert (_distortion(brightness=20.0)(grey) == 120).all()
    assert (_distortion(brightness=-20.0, contrast=1.5)(grey) == 120).all()  # contrast last: (100 - 20) * 1.5
    # brightness comes first either way; contrast_first only places contrast before or after the HSV part
    assert (_distortion(brightness=-20.0, contrast=1.5, contrast_first=True)(grey) == 120).all()
    assert (_distortion(brightness=32.0, contrast=1.5)(np.full((2, 2, 3), 200, np.uint8)) == 255).all()  # clipped
    assert (_distortion(brightness=-32.0)(np.full((2, 2, 3), 10, np.uint8)) == 0).all()


def test_photometric_saturation_one_and_hue_zero_are_identity():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = _distortion(saturation=1.0, hue=0.0)(image)
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - image).max() <= 1  # HSV round trip in float32


def test_photometric_saturation_and_hue_by_hand():
    red = np.zeros((2, 2, 3), np.uint8)
    red[..., 0] = 200
    assert (_distortion(saturation=0.5)(red) == [200, 100, 100]).all()  # half saturated: min = max / 2
    assert (_distortion(hue=-120.0)(red) == [0, 0, 200]).all()  # red (0 degrees) -> blue (240 degrees)
    assert (_distortion()(red) == red).all()


def test_photometric_draws_follow_mmdetection_ranges():
    rng = np.random.default_rng(0)
    draws = [PhotometricDistortion.draw(rng) for _ in range(400)]
    for name, low, high in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5), ("hue", -18, 18)):
        values = [getattr(d, name) for d in draws if getattr(d, name) is not None]
        assert 150 < len(values) < 250 and low <= min(values) and max(values) <= high  # each with probability 0.5
    assert 150 < sum(d.contrast_first for d in draws) < 250
