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

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

BOX_DECIMALS = 2
"""Pixels: 0.01 px is far below any IoU threshold's sensitivity."""
SCORE_DECIMALS = 4
"""Score step 1e-4: well above fp32 noise of the model's sigmoid scores, below any meaningful gap."""


def to_records(
    image_id: int, prediction: dict[str, Tensor], category_ids: set[int] | frozenset[int]
) -> tuple[list[dict[str, Any]], int]:
    """One image's prediction (boxes (K, 4) xyxy px, scores (K,), labels (K,)) as rounded COCO records.

    Returns the records (labels outside ``category_ids`` dropped) and how many were dropped.
    """
    boxes = prediction["boxes"].detach().to(torch.float64).cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = prediction["scores"].detach().to(torch.float64).cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    records = []
    dropped = 0
    for box, score, label in zip(xywh, scores, labels):
        if int(label) not in category_ids:
            dropped += 1
            continue
        records.append(
            {
                "image_id": int(image_id),
                "category_id": int(label),
                "bbox": [round(v, BOX_DECIMALS) + 0.0 for v in box],
                "score": round(score, SCORE_DECIMALS) + 0.0,
            }
        )
    return records, dropped


def sort_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in the canonical order: image id, score descending, category id, box."""
    return sorted(records, key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))


def write_json_atomic(path: Path, payload: Any, indent: int | None = None) -> None:
    """Write ``payload`` as JSON to ``path`` via a temporary file and a rename (never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=indent, sort_keys=indent is not None)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_detections(path: Path, records: list[dict[str, Any]]) -> None:
    """Write a COCO results JSON (one record per line inside the list, for diffable files), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("[\n")
        for i, record in enumerate(records):
            f.write(json.dumps(record) + (",\n" if i + 1 < len(records) else "\n"))
        f.write("]\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_detections(path: Path) -> list[dict[str, Any]]:
    """Read a COCO results JSON written by :func:`write_detections` (or any COCO results list)."""
    with open(path) as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path} is not a COCO results list (a JSON list of detection records)")
    return records
