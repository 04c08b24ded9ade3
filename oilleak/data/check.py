"""``oilleak check``: the dataset checks over train and val and their report.

:func:`check_dataset` loads each split with :func:`oilleak.data.coco.load_split`, which records every
problem it meets; :class:`DataReport` groups them by kind with the fix for each kind and adds the class
statistics. ``oilleak check`` prints it and training calls it before its first iteration.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from oilleak.config import DataConfig
from oilleak.data.coco import FIXES, CocoSplit, Problem, load_split
from oilleak.errors import OilleakError


@dataclass
class DataReport:
    """What ``check_dataset`` found: the checked splits with their problems and statistics."""

    splits: dict[str, CocoSplit]

    @property
    def problems(self) -> list[Problem]:
        return [p for s in self.splits.values() for p in s.problems]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format_stats(self) -> str:
        lines = []
        for split in self.splits.values():
            lines.append(f"{split.name}: {split.ann_file}, images in {split.img_dir}")
            if split.cat_ids:
                lines.append(f"  images {len(split.records)}, negatives (no instance) {split.negatives}")
            elif not Path(split.ann_file).is_file():
                lines.append("  not loaded: the annotation file does not exist")
            else:
                lines.append(f"  images {len(split.records)}; instances not counted: the class names do not match")
            lines.append(f"  semantic maps: {split.sem_source}")
            if split.cat_ids:
                width = max(len("class"), *(len(c) for c in split.classes))
                lines.append(f"  {'class':<{width}}  {'images':>7}  {'instances':>9}  {'tiny (<32x32)':>13}")
                for name, stats in split.class_stats().items():
                    lines.append(f"  {name:<{width}}  {stats.images:>7}  {stats.instances:>9}  {stats.tiny:>13}")
        return "\n".join(lines)

    def format_problems(self, max_shown: int = 5) -> str:
        lines = []
        for severity, problems in (("error", self.errors), ("warning", self.warnings)):
            groups: dict[str, list[Problem]] = defaultdict(list)
            for p in problems:
                groups[p.kind].append(p)
            for kind, group in groups.items():
                lines.append(f"{severity}: {kind} ({len(group)}); fix: {FIXES[kind]}")
                lines += ["  " + p.message.replace("\n", "\n  ") for p in group[:max_shown]]
                if len(group) > max_shown:
                    lines.append(f"  ... and {len(group) - max_shown} more")
        return "\n".join(lines)

    def format(self, max_shown: int = 5) -> str:
        verdict = "the dataset is usable" if self.ok else f"the dataset is NOT usable: {len(self.errors)} error(s)"
        parts = [self.format_stats(), self.format_problems(max_shown), f"{verdict}, {len(self.warnings)} warning(s)"]
        return "\n".join(p for p in parts if p)

    def raise_if_failed(self) -> None:
        """Training calls this before its first iteration."""
        if not self.ok:
            raise OilleakError("dataset check failed:\n" + self.format_problems())


def check_dataset(data_cfg: DataConfig, splits: tuple[str, ...] = ("train", "val"), decode_images: bool = True,
                  config_name: str = "your config") -> DataReport:
    """Check the splits of a dataset (all pixels read by default); see :func:`load_split`."""
    return DataReport({s: load_split(data_cfg, s, decode_images, config_name) for s in splits})
