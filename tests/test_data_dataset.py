"""The torch dataset on the bundled BSData sample: samples, collate, negatives, deterministic loaders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_data_layout import data_config, sample_root, write_image, write_json  # noqa: F401

from oilleak.data.coco import decode_masks, derive_sem_map
from oilleak.data.dataset import build_dataset, collate
from oilleak.data.transforms import load_image, rescale_size
from oilleak.errors import OilleakError
from oilleak.structures import SEM_IGNORE
from oilleak.train.sample_order import EpochBatches, train_loader


def mask_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


@pytest.fixture(scope="module")
def train_set(sample_root):
    # enlarging (s = 1.18): nearest resizing then keeps every source pixel, so mask boxes scale within 1 px
    return build_dataset(data_config(sample_root, ["Pitting"]), "train", train=True)


def test_train_samples_are_consistent(train_set):
    assert len(train_set) == 7 and train_set.classes == ["Pitting"] and train_set.cat_ids == [1]
    assert sorted(train_set.image_ids) == sorted(train_set.coco.getImgIds())
    flips = []
    for i in range(len(train_set)):
        sample, record = train_set[i], train_set.records[i]
        meta, t = sample.meta, sample.targets
        w, h = rescale_size(record.width, record.height, (1333, 800))
        assert sample.image.shape == (3, h, w) and meta.img_shape == (h, w) and meta.ori_shape == (record.height, record.width)
        assert meta.image_id == record.image_id and meta.file_name == record.file_name
        assert t.masks.dtype == torch.bool and t.masks.shape == (len(record.instances), h, w)
        assert t.labels.tolist() == [0] * len(record.instances) and t.sem_seg.dtype == torch.uint8
        original = train_set.targets_at_original(record)
        sx, sy = meta.scale_factor
        scale = torch.tensor([sx, sy, sx, sy])
        boxes = original.boxes * scale
        if meta.flip:
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        assert torch.allclose(t.boxes, boxes, atol=1e-3)
        for mask, mask0 in zip(t.masks, original.masks):
            expected = mask_box(mask0) * scale  # the original mask's box, resized (and flipped) by hand
            if meta.flip:
                expected = torch.stack([w - expected[2], expected[1], w - expected[0], expected[3]])
            assert torch.allclose(mask_box(mask), expected, atol=1.0)
        # the semantic map is the instance masks, derived at the original size then resized like them
        assert torch.equal(t.sem_seg == 1, t.masks.any(0)) and set(t.sem_seg.unique().tolist()) <= {0, 1}
        flips.append(meta.flip)
    assert any(flips) and not all(flips)  # flip_prob 0.5 over 7 images, fixed seed


def test_sample_semantic_map_at_original_size_matches_derivation(train_set):
    record = train_set.records[0]
    targets = train_set.targets_at_original(record)
    masks = decode_masks([i.rle for i in record.instances], record.height, record.width)
    assert np.array_equal(targets.sem_seg.numpy(), derive_sem_map(masks, np.zeros(len(masks), np.int64)))
    assert torch.allclose(targets.boxes, torch.tensor([i.box for i in record.instances], dtype=torch.float32))


def test_test_mode_has_no_targets_and_no_flip(sample_root):
    val = build_dataset(data_config(sample_root, ["Pitting"], flip_prob=1.0), "val", train=False)
    sample = val[0]
    assert sample.targets is None and sample.meta.flip is False and sample.meta.img_shape == (543, 1333)
    batch = collate([val[0], val[1]])
    assert batch.targets is None and batch.images.shape == (2, 3, 544, 1344)


def test_collate_pads_to_32_with_ignore_sem(train_set):
    batch = collate([train_set[0], train_set[1]])
    h, w = (max(train_set[i].image.shape[d] for i in (0, 1)) for d in (1, 2))
    assert batch.images.shape == (2, 3, -(-h // 32) * 32, -(-w // 32) * 32)
    for i, (meta, t) in enumerate(zip(batch.metas, batch.targets)):
        ih, iw = meta.img_shape
        assert t.sem_seg.shape == batch.images.shape[2:] and t.masks.shape[1:] == (ih, iw)
        assert (t.sem_seg[ih:] == SEM_IGNORE).all() and (t.sem_seg[:, iw:] == SEM_IGNORE).all()
        assert batch.images[i, :, ih:].abs().sum() == 0 and batch.images[i, :, :, iw:].abs().sum() == 0


def test_negatives_kept_or_dropped(tmp_path):
    write_image(tmp_path / "train" / "pos.png", 40, 30, seed=1)
    write_image(tmp_path / "train" / "neg.png", 40, 30, seed=2)
    coco = {
        "images": [{"id": 1, "file_name": "pos.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "neg.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 10, 10],
                         "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]], "area": 100}],
        "categories": [{"id": 1, "name": "oil"}],
    }
    write_json(tmp_path / "annotations" / "train.json", coco)
    kept = build_dataset(data_config(tmp_path, ["oil"], scale=(40, 30)), "train", train=True)
    assert kept.image_ids == [1, 2]
    negative = kept[1]
    assert negative.targets.boxes.shape == (0, 4) and negative.targets.masks.shape == (0, 30, 40)
    assert (negative.targets.sem_seg == 0).all()
    batch = collate([kept[0], negative])
    assert [len(t.boxes) for t in batch.targets] == [1, 0]
    dropped = build_dataset(data_config(tmp_path, ["oil"], keep_negatives=False), "train", train=True)
    assert dropped.image_ids == [1]
    assert build_dataset(data_config(tmp_path, ["oil"], keep_negatives=False), "train", train=False).image_ids == [1, 2]
    coco["annotations"] = []
    write_json(tmp_path / "annotations" / "train.json", coco)
    with pytest.raises(OilleakError, match="no images with instances"):
        build_dataset(data_config(tmp_path, ["oil"], keep_negatives=False), "train", train=True)


def _loader(dataset, batch_size: int, workers: int, seed: int):
    """The loader training uses (oilleak.train.sample_order), positioned by ``_epoch``."""
    batches = EpochBatches(len(dataset), batch_size=batch_size, seed=seed)
    return dataset, batches, train_loader(dataset, batches, collate=collate, workers=workers, pin_memory=False)


def _epoch(loader, epoch):
    dataset, batches, data = loader
    batches.set_position(epoch)
    dataset.set_epoch(epoch, batches.seed)  # as the training loop does before each epoch
    return [(m.image_id, m.flip, m.img_shape) for batch in data for m in batch.metas]


def test_loader_order_and_augmentation_depend_only_on_seed_and_epoch(sample_root):
    cfg = data_config(sample_root, ["Pitting"], scale=(333, 200), multi_scale=[(333, 200), (400, 240)])
    a = _loader(build_dataset(cfg, "train", train=True), batch_size=2, workers=0, seed=3)
    b = _loader(build_dataset(cfg, "train", train=True), batch_size=2, workers=2, seed=3)
    first = _epoch(a, 0)
    assert len(first) == 7 and sorted(i for i, _, _ in first) == sorted(a[0].image_ids)
    assert _epoch(b, 0) == first  # workers do not change the order, flips or scales
    assert _epoch(a, 1) == _epoch(b, 1) != first
    assert _epoch(a, 0) == first  # resume: epoch 0 again is epoch 0
    assert {shape for _, _, shape in first + _epoch(a, 1)} == {(136, 333), (163, 400)}  # both scales drawn
    other_seed = _loader(build_dataset(cfg, "train", train=True), batch_size=2, workers=0, seed=4)
    assert _epoch(other_seed, 0) != first


def test_photometric_is_drawn_from_the_sample_seed_and_leaves_other_draws(sample_root):
    plain = build_dataset(data_config(sample_root, ["Pitting"]), "train", train=True)
    distorted = build_dataset(data_config(sample_root, ["Pitting"], photometric=True), "train", train=True)
    for dataset in (plain, distorted):
        dataset.set_epoch(2, seed=5)
    a, b, again = plain[1], distorted[1], distorted[1]
    assert a.meta == b.meta and torch.equal(a.targets.boxes, b.targets.boxes)  # same scale and flip
    assert torch.equal(b.image, again.image) and not torch.equal(a.image, b.image)


def test_dataset_refuses_an_image_changed_after_the_check(tmp_path, sample_root):
    dataset = build_dataset(data_config(sample_root, ["Pitting"]), "val", train=False)
    record = dataset.records[0]
    original = record.path.read_bytes()
    try:
        write_image(record.path, 10, 10)
        with pytest.raises(OilleakError, match=f"{record.file_name}.*json says {record.width}x{record.height}"):
            dataset[0]
    finally:
        record.path.write_bytes(original)
    assert load_image(record.path).shape == (record.height, record.width, 3)
