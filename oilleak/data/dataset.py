"""The torch Dataset of a COCO split and ``collate`` into a :class:`~oilleak.structures.Batch` (training's
loader, which orders the samples, is :mod:`oilleak.train.sample_order`).

Random augmentation (flip, multi-scale, photometric distortion) of sample ``i`` in epoch ``e`` is drawn from a generator seeded with
``(seed, e, i)``, so an epoch yields the same batches whatever the number of workers and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from oilleak.config import DataConfig
from oilleak.data.coco import CocoSplit, ImageRecord, decode_masks, derive_sem_map, load_split, read_sem_map
from oilleak.data.transforms import PhotometricDistortion, load_image, pad_batch, prepare_image, transform_train
from oilleak.errors import OilleakError
from oilleak.structures import Batch, ImageMeta, Targets


@dataclass
class Sample:
    image: Tensor  # (3, h, w) float32 normalised, unpadded
    meta: ImageMeta
    targets: Targets | None  # training only, in input-tensor pixels


class CocoDataset(Dataset):
    """Images of one checked split. ``train=True``: random flip / multi-scale / photometric and targets; ``train=False``: the
    test transform and no targets (the ground truth for metrics is ``self.coco``)."""

    def __init__(self, split: CocoSplit, data_cfg: DataConfig, train: bool):
        self.split = split
        self.train = train
        self.scale = tuple(data_cfg.scale)
        self.multi_scale = [tuple(s) for s in data_cfg.multi_scale]
        self.flip_prob = data_cfg.flip_prob
        self.photometric = data_cfg.photometric
        records = split.records
        if train and not data_cfg.keep_negatives:
            records = [r for r in records if r.instances]
        if not records:
            kept = "" if data_cfg.keep_negatives else " with instances (data.keep_negatives is false)"
            raise OilleakError(f"the {split.name} split has no images{kept}; {split.ann_file}")
        self.records: list[ImageRecord] = records
        self.seed = 0
        self.epoch = 0

    @property
    def coco(self):
        return self.split.coco

    @property
    def cat_ids(self) -> list[int]:
        return self.split.cat_ids

    @property
    def classes(self) -> list[str]:
        return self.split.classes

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = epoch
        if seed is not None:
            self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def targets_at_original(self, record: ImageRecord) -> Targets:
        """Ground truth in original image pixels: boxes, labels, masks and the semantic map."""
        boxes, labels, masks = record.ground_truth()
        if record.sem_path is not None:
            sem = read_sem_map(record.sem_path, record.height, record.width, len(self.classes))
        else:
            crowd = decode_masks(record.crowd, record.height, record.width).any(0) if record.crowd else None
            sem = derive_sem_map(masks, labels, crowd)
        return Targets(*(torch.from_numpy(a) for a in (boxes, labels, masks, sem)))

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        image = load_image(record.path)
        if image.shape[:2] != (record.height, record.width):
            raise OilleakError(
                f"{record.path} is {image.shape[1]}x{image.shape[0]} (WxH) but the json says "
                f"{record.width}x{record.height}: the file changed after the dataset was checked; restore it, or "
                "re-create its annotations and run `oilleak check`"
            )
        if not self.train:
            tensor, meta = prepare_image(image, self.scale, record.image_id, record.file_name)
            return Sample(tensor, meta, None)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        scale = self.multi_scale[rng.integers(len(self.multi_scale))] if self.multi_scale else self.scale
        flip = bool(rng.random() < self.flip_prob)
        # drawn after the flip, so switching it on leaves every other draw as it was
        photometric = PhotometricDistortion.draw(rng) if self.photometric else None
        tensor, meta, targets = transform_train(
            image, self.targets_at_original(record), scale, flip, record.image_id, record.file_name, photometric
        )
        return Sample(tensor, meta, targets)


def build_dataset(data_cfg: DataConfig, split: str, train: bool, config_name: str = "your config") -> CocoDataset:
    """The dataset of ``split`` ('train' or 'val'); raises OilleakError listing every error of the split."""
    loaded = load_split(data_cfg, split, decode_images=False, config_name=config_name)
    if not loaded.ok:
        problems = "\n".join(f"  {p.message}" for p in loaded.problems if p.severity == "error")
        raise OilleakError(f"the {split} split cannot be used (run `oilleak check` for the full report):\n{problems}")
    return CocoDataset(loaded, data_cfg, train)


def collate(samples: list[Sample]) -> Batch:
    """Pad images with 0 (and semantic maps with 255) to the batch's largest size rounded up to 32."""
    images = [s.image for s in samples]
    metas = [s.meta for s in samples]
    if samples[0].targets is None:
        batch_images, _ = pad_batch(images)
        return Batch(batch_images, metas)
    batch_images, sem_segs = pad_batch(images, [s.targets.sem_seg for s in samples])
    targets = [Targets(s.targets.boxes, s.targets.labels, s.targets.masks, sem) for s, sem in zip(samples, sem_segs)]
    return Batch(batch_images, metas, targets)
