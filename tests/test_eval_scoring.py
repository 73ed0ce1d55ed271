"""COCO scoring: perfect predictions, the two scorers agree, empty predictions, category ids with gaps."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from pipeline.evaluation.coco_scoring import STAT_NAMES, score
from pipeline.evaluation.detections import canonical, to_records, to_rows

SAMPLE = Path(__file__).parent / "data" / "coco_sample" / "instances.json"


@pytest.fixture(scope="module")
def gt() -> dict:
    with open(SAMPLE) as f:
        data = json.load(f)
    assert len(data["images"]) == 12 and len(data["annotations"]) == 84
    return data


def _perturbed(gt: dict, seed: int = 0) -> list[dict]:
    """Two noisy copies of every box (some with a wrong class, a few dropped), plus false positives."""
    rng = random.Random(seed)
    category_ids = [c["id"] for c in gt["categories"]]
    dets = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(2):
            if rng.random() < 0.1:
                continue
            category = ann["category_id"] if rng.random() < 0.85 else rng.choice(category_ids)
            box = [
                x + rng.gauss(0, 0.08) * w,
                y + rng.gauss(0, 0.08) * h,
                w * (1 + rng.gauss(0, 0.1)),
                h * (1 + rng.gauss(0, 0.1)),
            ]
            dets.append(
                {"image_id": ann["image_id"], "category_id": category, "bbox": box, "score": rng.random()}
            )
    for image in gt["images"]:
        for _ in range(5):
            w, h = rng.uniform(5, 200), rng.uniform(5, 200)
            box = [rng.uniform(0, image["width"] - w), rng.uniform(0, image["height"] - h), w, h]
            dets.append(
                {
                    "image_id": image["id"],
                    "category_id": rng.choice(category_ids),
                    "bbox": box,
                    "score": rng.random(),
                }
            )
    return dets


@pytest.mark.parametrize("scorer", ["faster", "pycocotools"])
def test_ground_truth_as_predictions_scores_one(gt: dict, scorer: str) -> None:
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in gt["annotations"]
        if not a["iscrowd"]
    ]
    m = score(gt, dets, scorer)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        assert m.stats[name] == pytest.approx(1.0, abs=1e-12), name
    # 1 or 10 detections per image and class cannot recall an image's 11+ objects of one class.
    assert 0.0 < m.stats["AR1"] < m.stats["AR10"] < 1.0
    with_gt = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    assert {c for c, ap in m.per_class_ap.items() if ap is not None} == with_gt
    assert all(m.per_class_ap[c] == pytest.approx(1.0) for c in with_gt)
    assert m.num_detections == 82 and m.num_images == 12


def test_faster_coco_eval_gives_pycocotools_numbers(gt: dict) -> None:
    dets = _perturbed(gt)
    faster = score(gt, dets, "faster")
    reference = score(gt, dets, "pycocotools")
    # Not a trivial set: mid-range on every stat.
    assert all(0.05 < reference.stats[name] < 0.95 for name in STAT_NAMES), reference.stats
    # Equal up to the last bit of a float64 mean (the two libraries divide in a different order).
    for name in STAT_NAMES:
        assert faster.stats[name] == pytest.approx(reference.stats[name], abs=1e-12, rel=0), name
        assert round(faster.stats[name], 10) == round(reference.stats[name], 10), name
    assert faster.per_class_ap.keys() == reference.per_class_ap.keys()
    for cat, ap in reference.per_class_ap.items():
        assert (ap is None) == (faster.per_class_ap[cat] is None)
        if ap is not None:
            assert faster.per_class_ap[cat] == pytest.approx(ap, abs=1e-12, rel=0), cat
    for key, curve in reference.pr_curves.items():
        assert faster.pr_curves[key] == pytest.approx(curve, abs=1e-12, rel=0), key


def test_scoring_does_not_modify_its_inputs(gt: dict) -> None:
    dets = _perturbed(gt, seed=1)
    gt_before, dets_before = copy.deepcopy(gt), copy.deepcopy(dets)
    score(gt, dets, "pycocotools")
    score(gt, dets, "faster")
    assert gt == gt_before and dets == dets_before


@pytest.mark.parametrize("scorer", ["faster", "pycocotools"])
def test_empty_predictions_score_zero(gt: dict, scorer: str) -> None:
    m = score(gt, [], scorer)
    assert all(m.stats[name] == 0.0 for name in STAT_NAMES), m.stats
    assert all(ap in (0.0, None) for ap in m.per_class_ap.values())
    assert m.num_detections == 0


def test_no_ground_truth_in_a_range_is_none_not_minus_one(gt: dict) -> None:
    large_only = {**gt, "annotations": [a for a in gt["annotations"] if a["area"] > 96**2]}
    dets = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 0.9}
        for a in large_only["annotations"]
    ]
    m = score(large_only, dets, "faster")
    assert m.stats["APs"] is None and m.stats["APm"] is None and m.stats["APl"] == pytest.approx(1.0)


def test_unknown_image_or_category_is_refused(gt: dict) -> None:
    det = {"image_id": 30, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.5}
    with pytest.raises(ValueError, match="image ids absent"):
        score(gt, [{**det, "image_id": 31}])
    with pytest.raises(ValueError, match="category ids absent"):
        score(gt, [{**det, "category_id": 12}])  # 12 is one of COCO's gaps
    with pytest.raises(ValueError, match="scorer"):
        score(gt, [det], scorer="lvis")


def test_category_ids_with_coco_gaps_pass_through(gt: dict) -> None:
    """Labels are the dataset's category ids: 90 stays 90 (not 80, its contiguous index); gap ids drop."""
    table = frozenset(c["id"] for c in gt["categories"])
    assert 90 in table and 12 not in table and sorted(table).index(90) + 1 == 80
    prediction = {
        "boxes": torch.tensor(
            [[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0], [7.0, 7.0, 9.0, 9.0]]
        ),
        "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        "labels": torch.tensor([90, 12, 0, 44]),
    }
    rows, dropped = to_rows(30, prediction, table)
    records = to_records(rows)
    assert dropped == 2
    assert [r["category_id"] for r in records] == [90, 44]
    assert records[0]["bbox"] == [10.0, 20.0, 40.0, 40.0]

    # Scoring in the dataset's id space: ground truth of class 90 is found by a class-90 prediction only.
    right, wrong = [], []
    for ann in (a for a in gt["annotations"] if a["category_id"] == 90):
        x, y, w, h = ann["bbox"]
        pred = {"boxes": torch.tensor([[x, y, x + w, y + h]]), "scores": torch.tensor([0.9])}
        right += to_records(to_rows(ann["image_id"], {**pred, "labels": torch.tensor([90])}, table)[0])
        wrong += to_records(to_rows(ann["image_id"], {**pred, "labels": torch.tensor([80])}, table)[0])
    assert right and score(gt, right).per_class_ap[90] == pytest.approx(1.0)
    assert score(gt, wrong).per_class_ap[90] == 0.0


def test_records_are_rounded_and_sorted_canonically() -> None:
    prediction = {
        "boxes": torch.tensor([[1.004, 2.006, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 6.0]]),
        "scores": torch.tensor([0.123456, 0.5, 0.5]),
        "labels": torch.tensor([2, 3, 1]),
    }
    rows, _ = to_rows(7, prediction, frozenset({1, 2, 3}))
    first = to_records(rows)[0]
    assert first["bbox"] == [1.0, 2.01, 2.0, 1.99] and first["score"] == 0.1235
    assert json.dumps(first) == (
        '{"image_id": 7, "category_id": 2, "bbox": [1.0, 2.01, 2.0, 1.99], "score": 0.1235}'
    )
    other, _ = to_rows(3, prediction, frozenset({2}))
    ordered = to_records(canonical([rows, other]))
    assert [(r["image_id"], r["category_id"]) for r in ordered] == [(3, 2), (7, 1), (7, 3), (7, 2)]
