"""Evaluation plots as PNG files: precision-recall curves per class and the confusion matrix.

Drawn on matplotlib's Agg canvas directly (no pyplot), so nothing depends on a display or on a global
backend setting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from oilleak.evaluate.confusion import MATCH_IOU
from oilleak.evaluate.coco_eval import IOU_TYPES, EvalResult
from oilleak.visualize import palette

RECALL = np.linspace(0.0, 1.0, 101)  # COCOeval's recall points
_TITLES = {"bbox": "boxes", "segm": "masks"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_pr_curves(result: EvalResult, out_dir: Path) -> list[Path]:
    """``pr_curves_bbox.png`` and ``pr_curves_segm.png``: precision against recall for each class at IoU
    0.50 and 0.75 (COCO's interpolated precision, 100 detections per image). Classes without ground truth
    have no curve and are marked so in the legend."""
    colours = [tuple(c / 255 for c in rgb) for rgb in palette(len(result.class_names))]
    paths = []
    for iou_type in IOU_TYPES:
        fig = Figure(figsize=(11, 4.8))
        for col, (t, iou) in enumerate(((0, "0.50"), (5, "0.75"))):
            ax = fig.add_subplot(1, 2, col + 1)
            for k, name in enumerate(result.class_names):
                precision = result.precision[iou_type][t, :, k]
                if (precision < 0).all():
                    ax.plot([], [], color=colours[k], label=f"{name} (no GT)")
                    continue
                ap = precision[precision > -1].mean()
                ax.plot(RECALL, np.clip(precision, 0, None), color=colours[k], linewidth=1.6, label=f"{name} AP {ap:.3f}")
            ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=f"{_TITLES[iou_type]}, IoU {iou}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower left")
        paths.append(_save(fig, out_dir / f"pr_curves_{iou_type}.png"))
    return paths


def plot_confusion_matrix(matrix: np.ndarray, class_names: list[str], path: Path, score_thr: float, iou_thr: float = MATCH_IOU) -> Path:
    """Counts in each cell, colour by the share of its row (each ground-truth class sums to 1)."""
    names = [*class_names, "background"]
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    size = 2.5 + 0.75 * len(names)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    for g in range(len(names)):
        for p in range(len(names)):
            if matrix[g, p]:
                ax.text(p, g, str(matrix[g, p]), ha="center", va="center", fontsize=9,
                        color="white" if share[g, p] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="ground truth",
           title=f"mask IoU >= {iou_thr}, score >= {score_thr}\nlast row: false alarms, last column: misses")
    return _save(fig, path)
