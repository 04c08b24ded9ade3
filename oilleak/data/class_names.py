"""Matching the config's class names with a COCO json's category names (labels by NAME, never by json order)."""

from __future__ import annotations

import difflib
from collections import Counter
from pathlib import Path


def _near_matches(missing: list[str], extra: list[str]) -> list[str]:
    lines = []
    squash = {"".join(name.split()).casefold(): name for name in extra}
    for name in missing:
        same = squash.get("".join(name.split()).casefold())
        if same is not None:
            lines.append(f"'{name}' (config) and '{same}' (json) differ only in case or spaces")
            continue
        close = difflib.get_close_matches(name, extra, n=1, cutoff=0.6)
        if close:
            lines.append(f"'{name}' (config) looks like '{close[0]}' (json)")
    return lines


def match_classes(classes: list[str], categories: list[dict], ann_counts: Counter, ann_file: Path,
                  config_name: str) -> tuple[dict[int, int] | None, str]:
    """COCO category id -> label (index of the name in ``classes``), or (None, message) when they disagree.

    Every config class must be a category, and every category with annotations must be a config class.
    """
    by_name = {c["name"]: c["id"] for c in categories}
    missing = [c for c in classes if c not in by_name]
    extra = [c["name"] for c in categories if c["name"] not in classes and ann_counts[c["id"]] > 0]
    if not missing and not extra:
        return {by_name[name]: label for label, name in enumerate(classes)}, ""
    listed = ", ".join(f"'{c['name']}' (id {c['id']}, {ann_counts[c['id']]} annotations)" for c in categories)
    lines = [
        f"the class names in {config_name} do not match the categories of {ann_file}:",
        "  (mmdetection drops such annotations silently; with none left it fails: 'need at least one array to concatenate')",
        f"  config data.classes: {classes}",
        f"  json categories:     {listed or 'none'}",
    ]
    if missing:
        lines.append(f"  in the config, not in the json: {missing}")
    if extra:
        lines.append(f"  in the json (with annotations), not in the config: {extra}")
    near = _near_matches(missing, [c["name"] for c in categories if c["name"] not in classes])
    lines += [f"  near match: {line}" for line in near]
    names = [c["name"] for c in categories if ann_counts[c["id"]] > 0] or [c["name"] for c in categories]
    lines.append(
        f"  fix: edit data.classes in {config_name} to the json's names, e.g. classes: [{', '.join(names)}]\n"
        f"       or rename categories[].name in {ann_file} to the config's class names"
    )
    return None, "\n".join(lines)
