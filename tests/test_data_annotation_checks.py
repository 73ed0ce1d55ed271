"""The per-image annotation checks of the shard tasks, case by case, with exact outcomes."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.data import rejects as R
from pipeline.data.annotation_checks import check_annotations

CATEGORIES = frozenset({1, 2})


def _ann(ann_id: int, bbox: Any, category: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"id": ann_id, "image_id": 7, "bbox": bbox, "category_id": category, **extra}


@pytest.mark.parametrize(
    ("bbox", "category", "reason"),
    [
        ([1, 2, 3], 1, R.MALFORMED_ANNOTATION),
        ([1, 2, 3, "4"], 1, R.MALFORMED_ANNOTATION),
        ([1, 2, 3, True], 1, R.MALFORMED_ANNOTATION),
        ((1, 2, 3, 4), 1, R.MALFORMED_ANNOTATION),
        ([1, 2, 3, 4], "1", R.MALFORMED_ANNOTATION),
        ([1, 2, 3, 4], True, R.MALFORMED_ANNOTATION),  # JSON true is not category 1
        ([1, 2, None, 4], 1, R.NON_FINITE_BOX),
        ([float("nan"), 2, 3, 4], 1, R.NON_FINITE_BOX),
        ([1, 2, float("inf"), 4], 1, R.NON_FINITE_BOX),
        ([1, 2, 10**400, 4], 1, R.NON_FINITE_BOX),  # json.loads reads integers of any size
        ([1, 2, 3, 4], 3, R.UNKNOWN_CATEGORY),
        ([1, 2, 0, 4], 1, R.ZERO_AREA_BOX),
        ([1, 2, 3, -4], 1, R.ZERO_AREA_BOX),
        ([-2, 2, 3, 4], 1, R.BOX_OUTSIDE_IMAGE),
        ([90, 2, 12, 4], 1, R.BOX_OUTSIDE_IMAGE),
    ],
)
def test_each_fault_is_one_reject_with_its_reason(bbox: Any, category: Any, reason: str) -> None:
    kept, rejects, fixes = check_annotations([_ann(3, bbox, category)], 7, 100, 50, CATEGORIES, repair=False)
    assert kept == [] and not fixes
    assert [(r.image_id, r.reason, r.annotation_id) for r in rejects] == [(7, reason, 3)]


def test_boxes_within_the_tolerance_are_kept_unchanged() -> None:
    anns = [_ann(1, [-1.0, 0, 101, 50]), _ann(2, [0, 0, 100.0, 51.0], 2), _ann(3, [5, 5, 1, 1])]
    kept, rejects, fixes = check_annotations(anns, 7, 100, 50, CATEGORIES, repair=False)
    assert kept == anns and rejects == [] and not fixes


def test_repair_drops_duplicates_clips_and_drops_what_has_no_area_inside() -> None:
    anns = [
        _ann(1, [90.0, 40.0, 20.0, 20.0], isfake=1),
        _ann(2, [90.0, 40.0, 20.0, 20.0], isfake=1),  # same fields but the id
        _ann(3, [90.0, 40.0, 20.0, 20.0], isfake=0),  # differs: kept
        _ann(4, [120.0, 10.0, 5.0, 5.0]),  # wholly outside
        _ann(5, [1.0, 1.0, 2.0, 2.0]),
    ]
    kept, rejects, fixes = check_annotations(anns, 7, 100, 50, CATEGORIES, repair=True)
    assert [a["id"] for a in kept] == [1, 3, 5]
    assert kept[0]["bbox"] == [90.0, 40.0, 10.0, 10.0] and kept[0]["area"] == 100.0 and kept[0]["isfake"] == 1
    assert kept[2] is anns[4]
    assert [(r.annotation_id, r.reason) for r in rejects] == [
        (2, R.DUPLICATE_ANNOTATION),
        (4, R.ZERO_AREA_BOX),
    ]
    assert fixes == {R.BOX_CLIPPED: 2}


def test_no_annotations_and_missing_ids() -> None:
    assert check_annotations([], 7, 10, 10, CATEGORIES, repair=False) == ([], [], {})
    _, rejects, _ = check_annotations(
        [{"bbox": [1, 1, 0, 1], "category_id": 1}], 7, 10, 10, CATEGORIES, repair=False
    )
    assert [(r.annotation_id, r.reason) for r in rejects] == [(None, R.ZERO_AREA_BOX)]
