"""COCO box scoring from in-memory ground truth and detections, with faster-coco-eval or pycocotools.

The only module that imports the COCO scorers. Both give the same numbers (``tests/test_eval_scoring``
proves it on a fixed perturbed prediction set); faster-coco-eval is the default because it is faster.

Ground truth is a COCO dataset dict (``images`` with ``id``/``width``/``height``, ``annotations`` with
``id``/``image_id``/``category_id``/``bbox`` xywh/``area``/``iscrowd``, ``categories`` with ``id``/``name``);
detections are a COCO results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``). Neither is
modified. An empty detection list scores 0 wherever there is ground truth (COCO's -1, "no ground truth
in this range", stays None), instead of pycocotools' ``IndexError``.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
"""The 12 numbers of COCO's summary, in COCOeval.stats order."""


@dataclass(frozen=True)
class CocoMetrics:
    """COCO bbox metrics of one detection set.

    ``stats`` holds the 12 summary numbers (fractions in [0, 1]) by name; None where COCO has no ground
    truth to score (its -1). ``per_class_ap`` maps category id -> AP@[.5:.95] (area all, 100 detections),
    None for a category without ground truth. ``pr_curves`` holds ``recall`` (COCO's 101 recall points)
    and the interpolated precision at each, averaged over categories with ground truth, for ``AP50``,
    ``AP75`` and ``AP`` (mean over the ten IoU thresholds); empty lists when no category has ground truth.
    """

    stats: dict[str, float | None]
    per_class_ap: dict[int, float | None]
    pr_curves: dict[str, list[float]]
    num_images: int
    num_detections: int


def score(gt: dict[str, Any], detections: list[dict[str, Any]], scorer: str = "faster") -> CocoMetrics:
    """Score ``detections`` against ``gt`` with COCO's bbox protocol.

    Args:
        gt: COCO dataset dict (see the module docstring); ``categories`` defines the scored classes.
        detections: COCO results list; every ``image_id`` and ``category_id`` must exist in ``gt``.
        scorer: ``faster`` (faster-coco-eval) or ``pycocotools``.

    Raises:
        ValueError: an unknown scorer, or detections naming images or categories that ``gt`` lacks.
    """
    _check_inputs(gt, detections)
    # Both scorers write into the dicts they are given (pycocotools adds "ignore" to ground truth,
    # loadRes adds "area", "id" and a polygon to results): give them copies.
    gt_copy = {
        "images": [dict(image) for image in gt["images"]],
        "annotations": [dict(ann) for ann in gt["annotations"]],
        "categories": [dict(cat) for cat in gt["categories"]],
    }
    results = [
        {
            "image_id": d["image_id"],
            "category_id": d["category_id"],
            "bbox": [float(v) for v in d["bbox"]],
            "score": float(d["score"]),
        }
        for d in detections
    ]
    if scorer == "faster":
        evaluator = _run_faster(gt_copy, results)
    elif scorer == "pycocotools":
        evaluator = _run_pycocotools(gt_copy, results)
    else:
        raise ValueError(f"scorer must be 'faster' or 'pycocotools', got {scorer!r}")
    return _metrics(evaluator, gt_copy, len(results))


def _check_inputs(gt: dict[str, Any], detections: list[dict[str, Any]]) -> None:
    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"ground truth dict lacks {key!r}; expected a COCO dataset dict")
    for ann in gt["annotations"][:1]:
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd") if k not in ann]
        if missing:
            raise ValueError(f"ground-truth annotations lack {missing}; build them with ground_truth.py")
    image_ids = {image["id"] for image in gt["images"]}
    category_ids = {cat["id"] for cat in gt["categories"]}
    unknown_images = {d["image_id"] for d in detections} - image_ids
    if unknown_images:
        raise ValueError(
            f"detections name image ids absent from the ground truth: {sorted(unknown_images)[:10]}"
        )
    unknown_cats = {d["category_id"] for d in detections} - category_ids
    if unknown_cats:
        raise ValueError(
            f"detections name category ids absent from the ground truth's category table: "
            f"{sorted(unknown_cats)[:10]}; predictions must use the dataset's own category ids"
        )


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    return None


def _run_faster(gt: dict[str, Any], results: list[dict[str, Any]]) -> Any:
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt, print_function=_quiet)
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=_quiet)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator


def _run_pycocotools(gt: dict[str, Any], results: list[dict[str, Any]]) -> Any:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            # loadRes([]) raises IndexError; an empty result set is a valid (all-miss) submission.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(gt["images"]),
                "categories": list(gt["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def _metrics(evaluator: Any, gt: dict[str, Any], num_detections: int) -> CocoMetrics:
    raw = [float(v) for v in np.asarray(evaluator.stats)[: len(STAT_NAMES)]]
    stats = {name: (None if value < 0 else value) for name, value in zip(STAT_NAMES, raw)}
    # precision: (iou thresholds T=10, recall points R=101, categories K, area ranges A=4, max dets M=3);
    # area "all" is index 0 and 100 detections the last.
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]
    cat_ids = [int(c) for c in evaluator.params.catIds]
    per_class_ap: dict[int, float | None] = {}
    for k, cat_id in enumerate(cat_ids):
        values = precision[:, :, k]
        valid = values[values > -1]
        per_class_ap[cat_id] = float(valid.mean()) if valid.size else None
    with_gt = [k for k in range(len(cat_ids)) if (precision[:, :, k] > -1).any()]
    recall = [float(r) for r in np.asarray(evaluator.params.recThrs)]
    if with_gt:
        iou_thrs = np.asarray(evaluator.params.iouThrs)
        by_class = precision[:, :, with_gt]
        curves = {
            "recall": recall,
            "AP50": by_class[int(np.argmin(np.abs(iou_thrs - 0.5)))].mean(axis=1).tolist(),
            "AP75": by_class[int(np.argmin(np.abs(iou_thrs - 0.75)))].mean(axis=1).tolist(),
            "AP": by_class.mean(axis=(0, 2)).tolist(),
        }
    else:
        curves = {"recall": [], "AP50": [], "AP75": [], "AP": []}
    return CocoMetrics(
        stats=stats,
        per_class_ap=per_class_ap,
        pr_curves=curves,
        num_images=len(gt["images"]),
        num_detections=num_detections,
    )
