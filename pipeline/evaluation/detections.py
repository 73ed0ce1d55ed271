"""Detections as COCO results records: conversion, rounding, a deterministic order, the JSON file.

A record is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in the original image's
pixels and the dataset's own category ids (class index == category id in our models, so COCO's 1..90
with gaps pass through unchanged; a label outside the category table is dropped and counted).

Boxes are rounded to :data:`BOX_DECIMALS` and scores to :data:`SCORE_DECIMALS` *before* scoring, and
records are sorted by (image id, score descending, category id, box), so the scored set and its order
are a function of the rounded values alone: the order in which ranks or batches produced them does not
show, nor does fp32 noise from the batch's composition (~1e-6 in logits: 1e-8 in a score, 1e-5 px in a
box), except for a value that lies within that noise of a rounding boundary (odds ~1e-4 per value for
scores, less for boxes), which can change a detection's rank among equal scores or its last digit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert

BOX_DECIMALS = 2
"""Pixels: 0.01 px is far below any IoU threshold's sensitivity."""
SCORE_DECIMALS = 4
"""Score step 1e-4: well above fp32 noise of the model's sigmoid scores, below any meaningful gap."""


COLUMNS = ("image_id", "category_id", "x", "y", "w", "h", "score")
"""Columns of the compact form, (N, 7) float64 rows, in which ranks keep and send their detections."""


def to_rows(
    image_id: int, prediction: dict[str, Tensor], category_ids: set[int] | frozenset[int]
) -> tuple[np.ndarray, int]:
    """One image's prediction (boxes (K, 4) xyxy px, scores (K,), labels (K,)) as rounded rows (K', 7).

    Returns the rows (labels outside ``category_ids`` dropped) and how many were dropped.
    """
    boxes = box_convert(prediction["boxes"].detach().to(torch.float64).cpu(), "xyxy", "xywh").numpy()
    scores = prediction["scores"].detach().to(torch.float64).cpu().numpy()
    labels = prediction["labels"].detach().cpu().numpy()
    keep = np.isin(labels, np.fromiter(category_ids, dtype=np.int64))
    rows = np.empty((int(keep.sum()), len(COLUMNS)), dtype=np.float64)
    rows[:, 0] = image_id
    rows[:, 1] = labels[keep]
    # "+ 0.0" turns -0.0 into 0.0, so equal values print equally.
    rows[:, 2:6] = np.round(boxes[keep], BOX_DECIMALS) + 0.0
    rows[:, 6] = np.round(scores[keep], SCORE_DECIMALS) + 0.0
    return rows, int((~keep).sum())


def quantize(prediction: dict[str, Tensor]) -> dict[str, Tensor]:
    """A prediction with boxes (K, 4) and scores (K,) rounded to the record steps, in float64."""
    return {
        **prediction,
        "boxes": torch.round(prediction["boxes"].detach().double(), decimals=BOX_DECIMALS),
        "scores": torch.round(prediction["scores"].detach().double(), decimals=SCORE_DECIMALS),
    }


def canonical(parts: Iterable[np.ndarray]) -> np.ndarray:
    """All rows in the canonical order: image id, score descending, category id, box."""
    rows = np.concatenate([np.empty((0, len(COLUMNS))), *parts])
    order = np.lexsort((rows[:, 5], rows[:, 4], rows[:, 3], rows[:, 2], rows[:, 1], -rows[:, 6], rows[:, 0]))
    return rows[order]


def to_records(rows: np.ndarray) -> list[dict[str, Any]]:
    """Rows (N, 7) as a COCO results list."""
    return [
        {"image_id": int(r[0]), "category_id": int(r[1]), "bbox": r[2:6], "score": r[6]}
        for r in rows.tolist()
    ]
