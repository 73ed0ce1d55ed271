"""Figures of an evaluation: the precision-recall curve and images with drawn detections.

The only module that imports matplotlib. It uses the object API with the Agg canvas (no pyplot global
state, no display), so it is safe in workers and under tests.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from pipeline.checkpoint import atomic_write_bytes


def _save(fig: Figure, path: Path, dpi: float) -> None:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=path.suffix.lstrip(".").replace("jpg", "jpeg"))
    atomic_write_bytes(path, buffer.getvalue())


def plot_pr_curves(curves_by_run: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Save precision-recall curves (COCO's 101-point interpolated precision, mean over classes).

    Args:
        curves_by_run: run label (``plain``, ``tta_one_to_one`` ...) -> ``CocoMetrics.pr_curves``
            (``recall`` and precision per ``AP50``/``AP75``/``AP``).
        path: the PNG to write.
    """
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    styles = {"AP50": "-", "AP75": "--", "AP": ":"}
    for run, curves in curves_by_run.items():
        if not curves.get("recall"):
            continue
        for key, style in styles.items():
            ax.plot(curves["recall"], curves[key], style, label=f"{run} IoU={_iou_label(key)}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated, mean over classes)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no ground truth to score", ha="center", va="center")
    ax.set_title("Precision-recall (area all, 100 detections)")
    _save(fig, path, dpi=100)


def _iou_label(key: str) -> str:
    return {"AP50": "0.50", "AP75": "0.75", "AP": "0.50:0.95"}[key]


def draw_detections(
    image: Tensor,
    detections: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    category_names: dict[int, str],
    score_threshold: float,
    path: Path,
) -> None:
    """Save ``image`` with ground truth (green, dashed) and detections above ``score_threshold`` (red).

    Args:
        image: uint8 (3, H, W), the original image.
        detections: COCO results records of this image (``bbox`` xywh px, ``category_id``, ``score``).
        ground_truth: COCO annotations of this image (``bbox`` xywh px, ``category_id``).
        category_names: category id -> name.
        score_threshold: detections with a lower score are not drawn.
        path: the JPEG/PNG to write.
    """
    height, width = int(image.shape[1]), int(image.shape[2])
    dpi = 100.0
    fig = Figure(figsize=(width / dpi, height / dpi))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()))
    ax.set_axis_off()
    for ann in ground_truth:
        x, y, w, h = ann["bbox"]
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="lime", linewidth=1.5, linestyle="--"))
    for det in detections:
        if det["score"] < score_threshold:
            continue
        x, y, w, h = det["bbox"]
        ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="red", linewidth=1.5))
        name = category_names.get(det["category_id"], str(det["category_id"]))
        ax.text(
            x,
            y,
            f"{name} {det['score']:.2f}",
            color="white",
            fontsize=7,
            va="bottom",
            bbox={"facecolor": "red", "alpha": 0.6, "pad": 1, "linewidth": 0},
        )
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    _save(fig, path, dpi=dpi)
