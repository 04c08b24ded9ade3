"""A few images per split with their ground truth drawn (`oilleak check --gallery DIR`)."""

from __future__ import annotations

from pathlib import Path

from oilleak.data.check import DataReport
from oilleak.data.coco import ImageRecord
from oilleak.data.transforms import load_image
from oilleak.errors import OilleakError
from oilleak.visualize import draw_instances, save_image


def _pick(records: list[ImageRecord], count: int) -> list[ImageRecord]:
    """Up to ``count`` usable images spread over the split, annotated ones first."""
    usable = [r for r in records if r.usable]
    annotated = [r for r in usable if r.instances] or usable
    step = max(1, len(annotated) // max(count, 1))
    return annotated[::step][:count]


def write_gallery(report: DataReport, out_dir: Path, per_split: int = 4) -> list[Path]:
    """Write ``<split>_<image stem>.jpg`` files into ``out_dir``; refuses (before writing anything) when one
    of them already exists, so no file is ever overwritten."""
    jobs = [
        (split, record, out_dir / f"{split.name}_{Path(record.file_name).stem}.jpg")
        for split in report.splits.values()
        for record in _pick(split.records, per_split)
    ]
    existing = [str(path) for _, _, path in jobs if path.exists()]
    if existing:
        raise OilleakError(f"gallery files already exist: {', '.join(existing)}; pass an empty or new --gallery folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, record, path in jobs:
        boxes, labels, masks = record.ground_truth()
        save_image(draw_instances(load_image(record.path), boxes, labels, split.classes, masks), path)
    return [path for _, _, path in jobs]
