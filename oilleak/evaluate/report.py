"""An evaluation as a printed table and as files: metrics.json, per_class.csv, report.md.

A class without ground truth in the split is written "no GT" (null in JSON), never 0: COCO leaves its AP
undefined and excludes it from the mean.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from oilleak.evaluate.coco_eval import IOU_TYPES, SUMMARY_STATS, EvalResult

NO_GT = "no GT"
_IOU_TITLES = {"bbox": "box", "segm": "mask"}
_SUMMARY_TITLES = ("AP", "AP50", "AP75", "AP small", "AP medium", "AP large")  # of SUMMARY_STATS, in order


def _fmt(value: float, undefined: str = NO_GT) -> str:
    return undefined if math.isnan(value) else f"{value:.3f}"


def _class_rows(result: EvalResult) -> list[list[str]]:
    rows = []
    for k, name in enumerate(result.class_names):
        row = [name, str(result.per_class["bbox"][k].num_gt)]
        for iou_type in IOU_TYPES:
            c = result.per_class[iou_type][k]
            row += [_fmt(c.ap), _fmt(c.ap50), _fmt(c.ap75)]
        rows.append(row)
    return rows


def _class_header() -> list[str]:
    header = ["class", "GT"]
    for iou_type in IOU_TYPES:
        t = _IOU_TITLES[iou_type]
        header += [f"{t} AP", f"{t} AP50", f"{t} AP75"]
    return header


def _summary_rows(result: EvalResult) -> list[list[str]]:
    # an empty size bucket has no ground truth either; "n/a" keeps it apart from the per-class "no GT"
    return [
        [_IOU_TITLES[t]] + [_fmt(result.metrics[f"{t}_{k}"], "n/a") for k in SUMMARY_STATS] for t in IOU_TYPES
    ]


def result_table(result: EvalResult):
    """A rich renderable: the summary, the per-class table and, when variants exist, the merged view."""
    from rich.console import Group
    from rich.table import Table

    summary = Table(title="COCO metrics (IoU 0.50:0.95 unless named)")
    for title in ("", *_SUMMARY_TITLES):
        summary.add_column(title, justify="right")
    for row in _summary_rows(result):
        summary.add_row(*row)
    parts = [summary, _per_class_table(result, "per class")]
    if result.merged is not None:
        parts.append(_per_class_table(result.merged, "each class merged with its _dry and _susp variants"))
    return Group(*parts)


def _per_class_table(result: EvalResult, title: str):
    from rich.table import Table

    table = Table(title=title)
    for i, column in enumerate(_class_header()):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in _class_rows(result):
        table.add_row(*row)
    return table


def _nan_to_none(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


def result_to_dict(result: EvalResult) -> dict[str, Any]:
    out: dict[str, Any] = {
        "classes": result.class_names,
        "metrics": {k: _nan_to_none(v) for k, v in result.metrics.items()},
        "per_class": {
            t: [
                {"class": c.name, "num_gt": c.num_gt, "AP": _nan_to_none(c.ap), "AP50": _nan_to_none(c.ap50), "AP75": _nan_to_none(c.ap75)}
                for c in result.per_class[t]
            ]
            for t in IOU_TYPES
        },
    }
    if result.merged is not None:
        out["merged_variants"] = result_to_dict(result.merged)
    return out


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_reports(result: EvalResult, out_dir: Path, extra: dict[str, Any] | None = None) -> list[Path]:
    """Write metrics.json (with ``extra``, e.g. checkpoint and split), per_class.csv and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, csv_path, md_path = out_dir / "metrics.json", out_dir / "per_class.csv", out_dir / "report.md"

    payload = {**(extra or {}), **result_to_dict(result)}
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    views = [("classes", result)] + ([("merged variants", result.merged)] if result.merged is not None else [])
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["view", *_class_header()])
        for view, r in views:
            writer.writerows([view, *row] for row in _class_rows(r))

    md = ["# Evaluation", ""]
    md += [f"- {k}: {v}" for k, v in (extra or {}).items() if not isinstance(v, (dict, list))]
    md += ["", "## COCO metrics", "", _markdown_table(["", *_SUMMARY_TITLES], _summary_rows(result))]
    md += ["", "## Per class", "", _markdown_table(_class_header(), _class_rows(result))]
    if result.merged is not None:
        md += ["", "## Each class merged with its _dry and _susp variants", ""]
        md += [_markdown_table(["", *_SUMMARY_TITLES], _summary_rows(result.merged)), ""]
        md += [_markdown_table(_class_header(), _class_rows(result.merged))]
    md += ["", f"\"{NO_GT}\": the split has no ground truth of that class; COCO excludes it from the mean.", ""]
    md_path.write_text("\n".join(md), encoding="utf-8")
    return [metrics_path, csv_path, md_path]
