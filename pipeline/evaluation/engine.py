"""Distributed evaluation of a detector: inference on every rank, gather on rank 0, COCO scoring.

Used by the ``eval`` stage and by the training stages' periodic evaluation. Each rank infers the images
its sample stream yields (:func:`pipeline.evaluation.samples.eval_samples` gives every image to exactly
one rank) in batches of same-size images, turns the predictions into rounded COCO records
(:mod:`pipeline.evaluation.detections`), and sends records, ground-truth records and ATD anchor
distances to rank 0 (``torch.distributed.gather_object``; gloo on CPU). Rank 0 sorts everything
canonically and scores it, so neither the batch size nor the number of ranks shows in the result
(see :func:`same_size_batches` and :mod:`pipeline.evaluation.detections` for the fp32 noise).

Modes: ``plain`` (one pass at ``eval.short_side``/``eval.max_size``) and, with TTA on, ``tta_<merge>``
for each merge of ``tta.merges``.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dino_core.atd import average_top_k_distance
from pipeline.data.collate import Batch
from pipeline.data.transforms import Target, make_target
from pipeline.evaluation.coco_scoring import CocoMetrics, score
from pipeline.evaluation.config import EvalConfig, TTAConfig
from pipeline.evaluation.detections import canonical, to_records, to_rows
from pipeline.evaluation.ground_truth import build_ground_truth
from pipeline.evaluation.samples import EvalSample
from pipeline.evaluation.tta import (
    Augmentation,
    DetectorWithTTA,
    TransformFor,
    detect,
    eval_transform_for,
    to_original,
    transform_sample,
)

log = logging.getLogger(__name__)

PLAIN = "plain"


AnchorDistances = Callable[[Any, list[dict[str, Tensor]]], list[Tensor]]
"""(model outputs of a batch, per-image targets {"labels" (G,), "boxes" (G, 4) normalised cxcywh})
-> per-image L1 distances (G,) between each matched query's initial anchor and its ground-truth box."""


@dataclass
class ATDResult:
    """ATD(k) (paper eq. 1): the mean of the k largest anchor-to-target L1 distances of the eval set."""

    k: int
    value: float | None
    num_distances: int
    reason: str | None = None
    """Why ``value`` is None."""


@dataclass
class EvalRun:
    """What rank 0 knows after an evaluation (other ranks get None from :func:`evaluate`)."""

    metrics: dict[str, CocoMetrics]
    """Mode (``plain``, ``tta_one_to_one``, ``tta_nms``) -> COCO metrics."""
    detections: dict[str, list[dict[str, Any]]]
    """Mode -> canonical, rounded COCO results records."""
    atd: ATDResult
    ground_truth: dict[str, Any]
    num_images: int
    dropped_labels: dict[str, int]
    """Mode -> predictions dropped because their label is not in the category table."""
    timing: dict[str, float]
    world_size: int
    drawn: list[tuple[int, Tensor]] = field(default_factory=list)
    """(image id, uint8 image) of the images to draw (smallest ids)."""


class Progress:
    """Logs ``done/total``, the rate and the ETA at most every ``every_s`` seconds."""

    def __init__(self, label: str, total: int | None, every_s: float) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n: int) -> None:
        """Count ``n`` more items; log when ``every_s`` passed since the last line."""
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The progress line: count, rate and ETA."""
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.done / elapsed
        text = (
            f"{self.label}: {self.done}"
            + (f"/{self.total}" if self.total else "")
            + f" images, {rate:.2f} img/s"
        )
        if self.total and rate > 0:
            text += f", ETA {_duration(max(self.total - self.done, 0) / rate)}"
        return text


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def _target(record: dict[str, Any]) -> Target:
    anns = record["annotations"]
    return make_target(
        torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4),
        torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
        torch.tensor([bool(a["iscrowd"]) for a in anns], dtype=torch.bool),
        int(record["height"]),
        int(record["width"]),
    )


def _matchable(batch: Batch, device: torch.device) -> list[dict[str, Tensor]]:
    # ATD matches the final predictions to the non-crowd ground truth, normalised cxcywh of each image,
    # as the matcher sees it in training.
    return [
        {"labels": t["labels"][~t["iscrowd"]].to(device), "boxes": t["boxes"][~t["iscrowd"]].to(device)}
        for t in batch.targets
    ]


class _RankState:
    """What one rank accumulates and sends to rank 0."""

    def __init__(self, modes: Sequence[str], draw_images: int) -> None:
        self.rows: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
        self.dropped: dict[str, int] = dict.fromkeys(modes, 0)
        self.gt_records: list[dict[str, Any]] = []
        self.distances: list[float] = []
        self.draw_images = draw_images
        self._drawn: list[tuple[int, int, Tensor]] = []  # max-heap on image id via negation

    def add(
        self, mode: str, image_id: int, prediction: dict[str, Tensor], category_ids: frozenset[int]
    ) -> None:
        rows, dropped = to_rows(image_id, prediction, category_ids)
        self.rows[mode].append(rows)
        self.dropped[mode] += dropped

    def keep_for_drawing(self, sample: EvalSample) -> None:
        if self.draw_images == 0:
            return
        item = (-sample.image_id, sample.image_id, sample.image)
        if len(self._drawn) < self.draw_images:
            heapq.heappush(self._drawn, item)
        elif sample.image_id < self._drawn[0][1]:
            heapq.heapreplace(self._drawn, item)

    def payload(self) -> dict[str, Any]:
        return {
            "rows": {mode: canonical(parts) for mode, parts in self.rows.items()},
            "dropped": self.dropped,
            "gt_records": self.gt_records,
            "distances": self.distances,
            "drawn": [(image_id, image) for _, image_id, image in self._drawn],
        }


def _gather(payload: dict[str, Any]) -> list[dict[str, Any]] | None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [payload]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered


@torch.no_grad()
def evaluate(
    model: nn.Module,
    samples: Iterable[EvalSample],
    categories: Sequence[dict[str, Any]],
    eval_cfg: EvalConfig,
    tta_cfg: TTAConfig,
    transform_for: TransformFor = eval_transform_for,
    anchor_distances: AnchorDistances | None = None,
    expected_images: int | None = None,
) -> EvalRun | None:
    """Evaluate ``model`` on this rank's ``samples``; rank 0 gathers, scores and returns an :class:`EvalRun`.

    Args:
        model: a detector with ``forward(images (B, 3, H, W), image_sizes (B, 2))`` and
            ``postprocess(outputs, target_sizes (B, 2)) -> [{"scores", "labels", "boxes" xyxy px}]``.
            Put in eval mode for the call (its training mode is restored after).
        samples: this rank's evaluation images (each image on exactly one rank).
        categories: the dataset's category table (``id``, ``name``); labels outside it are dropped.
        eval_cfg: batch size, base resize, scorer, ATD k, drawing.
        tta_cfg: test-time augmentation; ``enabled=False`` gives the plain mode only.
        transform_for: an :class:`Augmentation`'s transform of an original image and its target (the
            data stage's eval transform by default).
        anchor_distances: ATD's per-image distances from the model outputs (``dino_core.atd``); None
            reports ATD as unavailable.
        expected_images: images this rank will see, for the progress line's ETA.

    Returns:
        The :class:`EvalRun` on rank 0, None on other ranks. All ranks must call this together.
    """
    base = Augmentation(eval_cfg.short_side, eval_cfg.max_size, flip=False)
    tta = DetectorWithTTA(model, tta_cfg, transform_for) if tta_cfg.enabled else None
    modes = [PLAIN] + ([f"tta_{how}" for how in tta_cfg.merges] if tta is not None else [])
    category_ids = frozenset(int(c["id"]) for c in categories)
    state = _RankState(modes, eval_cfg.draw_images)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    progress = Progress(f"eval rank {rank}", expected_images, eval_cfg.progress_every_s)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    start = time.perf_counter()
    infer_s = {"plain": 0.0, "tta": 0.0}
    try:
        for batch in same_size_batches(samples, eval_cfg.batch_size):
            t0 = time.perf_counter()
            transformed = [
                transform_sample(transform_for, base, s.image, s.image_id, _target(s.record)) for s in batch
            ]
            outputs, collated, predictions = detect(model, transformed)
            for sample, pred in zip(batch, to_original(predictions, collated, flip=False)):
                state.add(PLAIN, sample.image_id, pred, category_ids)
            if anchor_distances is not None:
                for d in anchor_distances(outputs, _matchable(collated, device)):
                    state.distances.extend(float(v) for v in d.detach().cpu().tolist())
            t1 = time.perf_counter()
            infer_s["plain"] += t1 - t0
            if tta is not None:
                out = tta([s.image for s in batch])
                for how, per_image in out.merged.items():
                    for sample, pred in zip(batch, per_image):
                        state.add(f"tta_{how}", sample.image_id, pred, category_ids)
                infer_s["tta"] += time.perf_counter() - t1
            for sample in batch:
                state.gt_records.append(sample.record)
                state.keep_for_drawing(sample)
            progress.update(len(batch))
    finally:
        model.train(was_training)
    log.info("%s (done)", progress.line())
    payload = state.payload()
    payload["timing"] = {
        "inference_s": time.perf_counter() - start,
        **{f"{k}_inference_s": v for k, v in infer_s.items()},
    }
    gathered = _gather(payload)
    if gathered is None:
        return None
    return _score_on_rank0(gathered, categories, modes, eval_cfg, anchor_distances is not None)


def same_size_batches(
    samples: Iterable[EvalSample], batch_size: int, max_buffered: int | None = None
) -> Iterator[list[EvalSample]]:
    """Group samples into batches of up to ``batch_size`` images that share one original size (H, W).

    Images of one original size have one size under every resize, so no batch is padded: no compute is
    spent on padding, and padding's effect on an image's outputs (~1e-6 in fp32 logits, measured) is gone.
    What remains of the batch's influence (kernels choosing another blocking for another batch size:
    ~1e-6 in logits on CPU at some shapes, none at others) is absorbed by rounding the detections
    (:mod:`pipeline.evaluation.detections`). At most ``max_buffered`` images (default ``4 * batch_size``)
    wait for a full batch; beyond that the largest group is emitted as a smaller batch.
    """
    limit = max(max_buffered or 4 * batch_size, batch_size)
    groups: dict[tuple[int, int], list[EvalSample]] = {}
    buffered = 0
    for sample in samples:
        key = (int(sample.image.shape[-2]), int(sample.image.shape[-1]))
        group = groups.setdefault(key, [])
        group.append(sample)
        buffered += 1
        if len(group) == batch_size:
            buffered -= len(groups.pop(key))
            yield group
        elif buffered > limit:
            largest = max(groups, key=lambda k: len(groups[k]))
            batch = groups.pop(largest)
            buffered -= len(batch)
            yield batch
    yield from groups.values()


def _score_on_rank0(
    gathered: list[dict[str, Any]],
    categories: Sequence[dict[str, Any]],
    modes: Sequence[str],
    eval_cfg: EvalConfig,
    with_atd: bool,
) -> EvalRun:
    gt = build_ground_truth((r for part in gathered for r in part["gt_records"]), categories)
    num_images = len(gt["images"])
    # Inference wall time is the slowest rank's; the per-mode times are compute summed over ranks.
    inference_s = max(part["timing"]["inference_s"] for part in gathered)
    timing = {
        "inference_s": inference_s,
        "images_per_s": num_images / max(inference_s, 1e-9),
        "plain_inference_s": sum(part["timing"]["plain_inference_s"] for part in gathered),
        "tta_inference_s": sum(part["timing"]["tta_inference_s"] for part in gathered),
    }
    detections = {mode: to_records(canonical(part["rows"][mode] for part in gathered)) for mode in modes}
    dropped = {mode: sum(part["dropped"][mode] for part in gathered) for mode in modes}
    metrics: dict[str, CocoMetrics] = {}
    for mode in modes:
        t0 = time.perf_counter()
        metrics[mode] = score(gt, detections[mode], eval_cfg.scorer)
        timing[f"scoring_s_{mode}"] = time.perf_counter() - t0
    distances = [d for part in gathered for d in part["distances"]]
    atd = (
        atd_of(distances, eval_cfg.atd_k)
        if with_atd
        else ATDResult(eval_cfg.atd_k, None, 0, "the model gives no anchors/ATD function (dino_core.atd)")
    )
    drawn = sorted((item for part in gathered for item in part["drawn"]), key=lambda item: item[0])
    return EvalRun(
        metrics=metrics,
        detections=detections,
        atd=atd,
        ground_truth=gt,
        num_images=num_images,
        dropped_labels=dropped,
        timing=timing,
        world_size=len(gathered),
        drawn=drawn[: eval_cfg.draw_images],
    )


ATD_DECIMALS = 6
"""ATD is rounded: a batch's composition moves the model's fp32 anchors by ~1e-7, the mean by ~1e-9."""


def atd_of(distances: Sequence[float], k: int) -> ATDResult:
    """ATD(k) over the whole evaluation set's distances (``dino_core.atd``); None with the reason below k."""
    try:
        value = average_top_k_distance(torch.tensor(distances, dtype=torch.float64), k)
    except ValueError as error:
        return ATDResult(k, None, len(distances), str(error))
    return ATDResult(k, round(value, ATD_DECIMALS), len(distances))
