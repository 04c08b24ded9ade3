"""The order of training samples, as a pure function of (seed, epoch), startable at any step of an epoch.

Exact resume needs batches that can start mid-epoch without loading the skipped images; the random
flip / scale of an image is the dataset's business and already depends only on (seed, epoch, index)
(``CocoDataset.set_epoch``), whichever loader worker draws it.

Under torchrun each rank takes every ``world_size``-th sample of the epoch's permutation (padded by
repetition, as DistributedSampler does) so all ranks run the same number of steps.

Batches group images by orientation, as mmdetection's ``AspectRatioBatchSampler``: walking the rank's share in
order, each image joins the bucket of its orientation (portrait: width < height) and a full bucket is the
next batch; what is left at the end of the epoch (less than a batch per orientation) follows in batches,
the portrait images first. A mixed batch would pad a 1333x800 and an 800x1333 image to about 1344x1344, and that padding
enters SAC's and the ASPP's global pools. The step count stays ceil(share / batch_size).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochBatches(Sampler[list[int]]):
    """Batches of one rank for one epoch, from ``start_step`` on; call ``set_position`` before each epoch."""

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        portrait: Sequence[bool] | None = None,
    ) -> None:
        """``portrait[i]``: sample i is higher than wide (batches group by it); None: one group."""
        if num_samples < 1:
            raise ValueError("no training samples")
        if portrait is not None and len(portrait) != num_samples:
            raise ValueError(f"portrait has {len(portrait)} entries for {num_samples} samples")
        self.portrait = list(portrait) if portrait is not None else [False] * num_samples
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = math.ceil(num_samples / world_size)
        self.steps_per_epoch = math.ceil(self.per_rank / batch_size)
        self.epoch = 0
        self.start_step = 0

    def set_position(self, epoch: int, start_step: int = 0) -> None:
        self.epoch = epoch
        self.start_step = start_step

    def epoch_order(self, epoch: int) -> list[int]:
        """The whole epoch's permutation, padded to a multiple of world_size (every rank's share)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        total = self.per_rank * self.world_size
        return (order * math.ceil(total / self.num_samples))[:total]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of ``epoch``, grouped by orientation (module docstring)."""
        order = self.epoch_order(epoch)
        share = [order[p] for p in range(self.rank, len(order), self.world_size)]  # in epoch order
        batches: list[list[int]] = []
        buckets: dict[bool, list[int]] = {False: [], True: []}
        for index in share:
            bucket = buckets[self.portrait[index]]
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batches.append(bucket.copy())
                bucket.clear()
        left = buckets[True] + buckets[False]  # portrait first, as mmdet (its bucket 0 is width < height)
        batches += [left[i : i + self.batch_size] for i in range(0, len(left), self.batch_size)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)[self.start_step :]


def train_loader(
    dataset: Dataset, batches: EpochBatches, *, collate: Callable, workers: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        # A generator of its own: otherwise each new iterator draws its worker base seed from the global
        # torch RNG, which a resumed run would draw at a different moment.
        generator=torch.Generator(),
    )
