"""What an evaluation leaves in its directory, and the numbers it hands to tracking.

- ``metrics.json`` (data contract 4): per mode (``plain``, ``tta_one_to_one``, ``tta_nms``) the 12 COCO
  numbers (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl; fractions in [0, 1], null where
  there is no ground truth in that range), per-class AP keyed by category id with its name, ATD(k) (null
  with the reason when unavailable); the checkpoint evaluated, the manifest's sha256, the image count, the
  settings and the timing. ``results`` and ``num_images`` do not depend on the batch size or the number
  of ranks or workers (``settings`` and ``timing`` do); the one caveat, a model float within fp32 noise
  of a rounding boundary, is described in :mod:`pipeline.evaluation.detections`.
- ``detections.json`` (plain), ``detections_tta.json`` (one-to-one merge) and ``detections_tta_nms.json``
  (NMS merge): COCO results lists in the original images' pixels and the dataset's category ids.
- ``pr_curve.png`` and ``drawn/<image id>.jpg`` (ground truth green, plain detections red).

Every file is written atomically. :class:`Tracker` is the hook the tracking module implements.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from pipeline.checkpoint import atomic_write_bytes
from pipeline.evaluation.coco_scoring import STAT_NAMES
from pipeline.evaluation.detections import BOX_DECIMALS, SCORE_DECIMALS
from pipeline.evaluation.engine import PLAIN, EvalRun
from pipeline.evaluation.plots import draw_detections, plot_pr_curves

METRICS_SCHEMA_VERSION = 1
DETECTION_FILES = {
    PLAIN: "detections.json",
    "tta_one_to_one": "detections_tta.json",
    "tta_nms": "detections_tta_nms.json",
}


class Tracker(Protocol):
    """Where an evaluation reports (the tracking module's MLflow run implements it)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log scalar metrics (``step``: the epoch for periodic evaluation)."""

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        """Log every file under ``directory``."""


def results_block(run: EvalRun, categories: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``results`` of ``metrics.json``: per mode the COCO numbers, per-class AP and ATD."""
    names = {int(c["id"]): str(c["name"]) for c in categories}
    results: dict[str, Any] = {}
    for mode, metrics in run.metrics.items():
        atd = (
            {
                "k": run.atd.k,
                "value": run.atd.value,
                "num_distances": run.atd.num_distances,
                "reason": run.atd.reason,
            }
            if mode == PLAIN
            else {
                "k": run.atd.k,
                "value": None,
                "num_distances": 0,
                "reason": "ATD measures the model's initial anchors; merged TTA predictions have none",
            }
        )
        results[mode] = {
            **{name: metrics.stats[name] for name in STAT_NAMES},
            "per_class_AP": {
                str(cat): {"name": names.get(cat, ""), "AP": ap}
                for cat, ap in sorted(metrics.per_class_ap.items())
            },
            "ATD": atd,
            "num_detections": metrics.num_detections,
            "dropped_labels": run.dropped_labels[mode],
        }
    return results


def flat_metrics(run: EvalRun) -> dict[str, float]:
    """Scalars for tracking: ``<mode>/<stat>`` (stats without ground truth left out) and ``plain/ATD<k>``."""
    flat = {
        f"{mode}/{name}": float(value)
        for mode, metrics in run.metrics.items()
        for name, value in metrics.stats.items()
        if value is not None
    }
    if run.atd.value is not None:
        flat[f"{PLAIN}/ATD{run.atd.k}"] = run.atd.value
    return flat


def detections_json(records: list[dict[str, Any]]) -> bytes:
    """A COCO results JSON list with one record per line (diffable, and equal runs give equal bytes)."""
    return ("[\n" + ",\n".join(json.dumps(r) for r in records) + ("\n" if records else "") + "]\n").encode()


def write_outputs(
    run: EvalRun,
    out_dir: Path,
    categories: list[dict[str, Any]],
    header: dict[str, Any],
    settings: dict[str, Any],
    draw_score_threshold: float,
) -> dict[str, Path]:
    """Write the evaluation's files into ``out_dir`` (see the module docstring); returns them by name.

    Args:
        run: rank 0's result of :func:`pipeline.evaluation.engine.evaluate`.
        categories: the dataset's category table (``id``, ``name``).
        header: ``checkpoint`` and ``dataset`` blocks of ``metrics.json`` (what was evaluated).
        settings: the evaluation settings to record (config, world size ...).
        draw_score_threshold: detections below it are not drawn.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for mode, records in run.detections.items():
        path = out_dir / DETECTION_FILES[mode]
        atomic_write_bytes(path, detections_json(records))
        files[path.name] = path
    path = out_dir / "pr_curve.png"
    plot_pr_curves({mode: m.pr_curves for mode, m in run.metrics.items()}, path)
    files[path.name] = path
    names = {int(c["id"]): str(c["name"]) for c in categories}
    gt_by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in run.ground_truth["annotations"]:
        gt_by_image.setdefault(ann["image_id"], []).append(ann)
    drawn_dets: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id, _ in run.drawn}
    for det in run.detections[PLAIN]:
        if det["image_id"] in drawn_dets:
            drawn_dets[det["image_id"]].append(det)
    for image_id, image in run.drawn:
        path = out_dir / "drawn" / f"{image_id}.jpg"
        draw_detections(
            image, drawn_dets[image_id], gt_by_image.get(image_id, []), names, draw_score_threshold, path
        )
        files[f"drawn/{path.name}"] = path
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        **header,
        "num_images": run.num_images,
        "results": results_block(run, categories),
        "settings": {
            **settings,
            "world_size": run.world_size,
            "box_decimals": BOX_DECIMALS,
            "score_decimals": SCORE_DECIMALS,
        },
        "timing": run.timing,
        "files": sorted(files),
    }
    path = out_dir / "metrics.json"
    atomic_write_bytes(path, (json.dumps(metrics, indent=1, sort_keys=True) + "\n").encode())
    files[path.name] = path
    return files
