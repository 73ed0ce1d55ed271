"""Checks and fixes of one image's annotation records, applied by every shard task.

COCO and any COCO-format dataset: boxes must be four finite numbers with positive width and height,
inside the image (up to ``OUTSIDE_TOLERANCE`` pixels of rounding), of a known category; otherwise the
annotation is rejected. Objects365's known faults are repaired instead, as its recipe does: exact
duplicates are dropped, boxes are clipped to the image, boxes left without area are dropped (each of
those is still a listed reject or a counted fix, never silent). Kept records are otherwise unchanged.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from pipeline.data import rejects as R
from pipeline.data.manifest import Reject

OUTSIDE_TOLERANCE = 1.0
"""Pixels a COCO box may pass the image border by (the source data has sub-pixel overshoots)."""


_BOX_VALUE_TYPES = frozenset((int, float, type(None)))
"""What a box value may parse to: a JSON number (``bool`` is not one) or null (rejected as non-finite)."""


def _box_types_ok(bbox: Any) -> bool:
    """Four numbers or nulls (nulls are rejected afterwards as non-finite)."""
    return type(bbox) is list and len(bbox) == 4 and _BOX_VALUE_TYPES.issuperset(map(type, bbox))


def _all_finite(bbox: list[int | float]) -> bool:
    try:
        return all(map(math.isfinite, bbox))
    except OverflowError:  # an integer beyond a float's range (json.loads reads any size)
        return False


def check_annotations(
    annotations: list[dict[str, Any]],
    image_id: int,
    width: int,
    height: int,
    category_ids: frozenset[int],
    *,
    repair: bool,
) -> tuple[list[dict[str, Any]], list[Reject], Counter[str]]:
    """Split one image's annotations into kept records, rejects and fix counts.

    ``repair`` selects the Objects365 policy (drop exact duplicates, clip to the image); without it a box
    beyond the image is rejected. Returns ``(kept, rejects, fixes)``; ``kept`` keeps the source order.
    """
    kept: list[dict[str, Any]] = []
    rejected: list[Reject] = []
    fixes: Counter[str] = Counter()
    seen: set[str] = set()
    for ann in annotations:
        ann_id = ann.get("id")
        if type(ann_id) is not int:
            ann_id = None
        bbox = ann.get("bbox")
        category = ann.get("category_id")
        reason = detail = None
        if not (_box_types_ok(bbox) and type(category) is int):
            reason, detail = R.MALFORMED_ANNOTATION, "needs 'bbox' [x, y, w, h] and an integer 'category_id'"
        elif None in bbox or not _all_finite(bbox):
            reason, detail = R.NON_FINITE_BOX, f"bbox {bbox}"
        elif category not in category_ids:
            reason, detail = R.UNKNOWN_CATEGORY, f"category_id {category}"
        elif repair:
            identity = json.dumps({k: v for k, v in ann.items() if k != "id"}, sort_keys=True)
            if identity in seen:
                reason, detail = R.DUPLICATE_ANNOTATION, "same fields as an earlier annotation of the image"
            seen.add(identity)
        if reason is not None:
            rejected.append(Reject(image_id, reason, ann_id, detail))
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            rejected.append(Reject(image_id, R.ZERO_AREA_BOX, ann_id, f"bbox {bbox}"))
            continue
        x0, y0, x1, y1 = x, y, x + w, y + h
        if repair:
            cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
            if cx1 <= cx0 or cy1 <= cy0:
                detail = f"bbox {bbox} has no area inside the {width}x{height} image"
                rejected.append(Reject(image_id, R.ZERO_AREA_BOX, ann_id, detail))
                continue
            if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
                fixes[R.BOX_CLIPPED] += 1
                ann = {**ann, "bbox": [cx0, cy0, cx1 - cx0, cy1 - cy0], "area": (cx1 - cx0) * (cy1 - cy0)}
        elif (
            x0 < -OUTSIDE_TOLERANCE
            or y0 < -OUTSIDE_TOLERANCE
            or x1 > width + OUTSIDE_TOLERANCE
            or y1 > height + OUTSIDE_TOLERANCE
        ):
            detail = f"bbox {bbox} beyond the {width}x{height} image"
            rejected.append(Reject(image_id, R.BOX_OUTSIDE_IMAGE, ann_id, detail))
            continue
        kept.append(ann)
    return kept, rejected, fixes
