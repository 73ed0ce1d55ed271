"""Test-time augmentation (paper appendix A): augmentations, inverse box transforms, merges, a wrapper.

Legend: K predictions of one image; boxes are ``(K, 4)`` xyxy in pixels; a *prediction* is a dict with
``boxes`` (K, 4) float, ``scores`` (K,) float and ``labels`` (K,) int64 (the dataset's category ids),
as the model's post-processing returns it.

An augmentation resizes the image (short side ``short_side``, long side capped at ``max_size``) and may
flip it horizontally. Predictions made on the augmented image are mapped back to the original image by
:func:`invert_boxes` before they are merged:

- :func:`one_to_one_merge`, the paper's ensembling: the main augmentation's predictions are kept and each
  is refined by at most one prediction from every other augmentation (no NMS);
- :func:`nms_merge`, the baseline: the union of all augmentations' predictions, class-wise NMS.

:class:`DetectorWithTTA` runs a detector under every augmentation and merges, in the style of
detectron2's ``GeneralizedRCNNWithTTA``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.ops import batched_nms, box_iou

from pipeline.data.collate import Batch, TransformedSample, collate
from pipeline.data.transforms import EvalTransform, Target, eval_transform, make_target
from pipeline.evaluation.config import TTAConfig
from pipeline.evaluation.detections import quantize

Prediction = dict[str, Tensor]
"""``{"boxes": (K, 4) xyxy float, "scores": (K,) float, "labels": (K,) int64}``."""


@dataclass(frozen=True)
class Augmentation:
    """One test-time augmentation: resize (short side, long-side cap), then an optional horizontal flip."""

    short_side: int
    max_size: int
    flip: bool = False
    weight: float = 1.0
    """Weight of this augmentation's boxes in the one-to-one merge."""

    @property
    def name(self) -> str:
        """``s<short_side>`` or ``s<short_side>_flip`` (the max size is shared by all TTA scales)."""
        return f"s{self.short_side}" + ("_flip" if self.flip else "")


def augmentations_from_config(cfg: TTAConfig) -> tuple[list[Augmentation], int]:
    """The augmentations of a TTA config (scales outer, unflipped before flipped) and the main one's index."""
    weights = list(cfg.scale_weights) or [1.0] * len(cfg.scales)
    augs: list[Augmentation] = []
    for scale, weight in zip(cfg.scales, weights):
        augs.append(Augmentation(scale, cfg.max_size, False, float(weight)))
        if cfg.flip:
            augs.append(Augmentation(scale, cfg.max_size, True, float(weight) * cfg.flip_weight))
    main = next(i for i, a in enumerate(augs) if a.short_side == cfg.main_scale and a.flip == cfg.main_flip)
    return augs, main


def _check_sizes(orig_size: Sequence[int], aug_size: Sequence[int]) -> tuple[int, int, int, int]:
    h, w = int(orig_size[0]), int(orig_size[1])
    ah, aw = int(aug_size[0]), int(aug_size[1])
    if min(h, w, ah, aw) <= 0:
        raise ValueError(f"image sizes must be positive, got original {(h, w)} and augmented {(ah, aw)}")
    return h, w, ah, aw


def apply_to_boxes(boxes: Tensor, orig_size: Sequence[int], aug_size: Sequence[int], flip: bool) -> Tensor:
    """Map boxes (K, 4) xyxy from the original image (h, w) into the augmented one (h', w').

    The augmentation resizes by (w'/w, h'/h) and then, if ``flip``, mirrors: x -> w' - x.
    """
    h, w, ah, aw = _check_sizes(orig_size, aug_size)
    scale = boxes.new_tensor([aw / w, ah / h, aw / w, ah / h])
    out = boxes * scale
    if flip:
        out = torch.stack([aw - out[:, 2], out[:, 1], aw - out[:, 0], out[:, 3]], dim=1)
    return out


def invert_boxes(boxes: Tensor, orig_size: Sequence[int], aug_size: Sequence[int], flip: bool) -> Tensor:
    """Map boxes (K, 4) xyxy predicted on the augmented image (h', w') back to the original (h, w).

    The inverse of :func:`apply_to_boxes`: un-flip in the augmented frame (x1 = w' - x2, x2 = w' - x1),
    then divide by the resize factors (w'/w, h'/h).
    """
    h, w, ah, aw = _check_sizes(orig_size, aug_size)
    out = boxes
    if flip:
        out = torch.stack([aw - out[:, 2], out[:, 1], aw - out[:, 0], out[:, 3]], dim=1)
    scale = boxes.new_tensor([aw / w, ah / h, aw / w, ah / h])
    return out / scale


def one_to_one_merge(
    predictions: Sequence[Prediction],
    weights: Sequence[float],
    main: int,
    iou_threshold: float,
    score_mode: str = "mean",
) -> Prediction:
    """The paper's one-to-one TTA ensembling of one image's predictions (appendix A).

    All predictions must already be in the original image's pixels. Let ``a = 0..A-1`` index the
    augmentations, ``m = main`` and ``w_a`` the weights. For every main prediction ``i`` (box ``b_i``,
    class ``c_i``, score ``s_i``):

    - every other augmentation ``a`` is matched one to one: in descending main score, each main
      prediction claims the still unclaimed prediction ``j`` of ``a`` of class ``c_i`` with the highest IoU
      with ``b_i``, if that IoU is strictly above ``iou_threshold`` (``u_a = 1``, else ``u_a = 0``), as
      COCO's evaluation matches detections to ground truth. A prediction of ``a`` thus refines at most
      one main prediction: a low-scored duplicate of a main box cannot borrow the confirmation of the
      box it duplicates. The main augmentation matches itself (``u_m = 1``, ``j = i``). Nothing is
      removed (no NMS).
    - merged box = ``sum_a u_a w_a s_aj b_aj / sum_a u_a w_a s_aj``, the average weighted by
      matched x weight x score (the main box when that sum is 0, i.e. a zero score);
    - merged score = ``sum_a u_a w_a s_aj / sum_a w_a`` for ``score_mode="mean"`` (the weighted mean over
      *all* augmentations with a miss counting 0, so predictions confirmed by many augmentations rank
      higher, as in weighted box fusion), or ``s_i`` for ``score_mode="main"``;
    - label = ``c_i``.

    Args:
        predictions: one prediction dict per augmentation, boxes (K_a, 4) xyxy.
        weights: per-augmentation weights (A,), positive.
        main: index of the main augmentation.
        iou_threshold: matching IoU threshold in (0, 1].
        score_mode: ``mean`` or ``main``.

    Returns:
        A prediction dict with the main augmentation's K_m predictions, sorted by score (descending).
    """
    if len(predictions) != len(weights):
        raise ValueError(
            f"one weight per augmentation: got {len(predictions)} predictions and {len(weights)} weights"
        )
    if not 0 <= main < len(predictions):
        raise ValueError(f"main augmentation index {main} out of range for {len(predictions)} augmentations")
    if score_mode not in ("mean", "main"):
        raise ValueError(f"score_mode must be 'mean' or 'main', got {score_mode!r}")
    ref = predictions[main]
    # float64: the merge of rounded inputs (see quantize) is then exact enough to be reproducible.
    ref_boxes, ref_scores, ref_labels = ref["boxes"].double(), ref["scores"].double(), ref["labels"]
    weighted_boxes = torch.zeros_like(ref_boxes)
    coef_sum = torch.zeros_like(ref_scores)
    for a, (pred, weight) in enumerate(zip(predictions, weights)):
        if a == main:
            boxes, scores, matched = ref_boxes, ref_scores, torch.ones_like(ref_scores)
        elif len(pred["scores"]) == 0 or len(ref_scores) == 0:
            continue
        else:
            best = _claim_one_to_one(ref_boxes, ref_scores, ref_labels, pred, iou_threshold)
            matched = (best >= 0).double()
            boxes = pred["boxes"].double()[best.clamp_min(0)]
            scores = pred["scores"].double()[best.clamp_min(0)]
        coef = matched * float(weight) * scores
        weighted_boxes += coef[:, None] * boxes
        coef_sum += coef
    safe = coef_sum > 0
    merged_boxes = torch.where(safe[:, None], weighted_boxes / coef_sum.clamp_min(1e-12)[:, None], ref_boxes)
    merged_scores = coef_sum / float(sum(weights)) if score_mode == "mean" else ref_scores.clone()
    order = torch.argsort(merged_scores, descending=True, stable=True)
    return {"boxes": merged_boxes[order], "scores": merged_scores[order], "labels": ref_labels[order]}


def _claim_one_to_one(
    ref_boxes: Tensor, ref_scores: Tensor, ref_labels: Tensor, pred: Prediction, iou_threshold: float
) -> Tensor:
    """For each main prediction (K_m,) the index of the prediction of ``pred`` it claims, or -1.

    Greedy in descending main score (ties: lower index first): the unclaimed same-class prediction with
    the highest IoU, strictly above ``iou_threshold``.
    """
    iou = box_iou(ref_boxes, pred["boxes"].double())  # (K_m, K_a)
    iou = iou.masked_fill(ref_labels[:, None] != pred["labels"][None, :], -1.0).numpy()
    claimed_by = np.full(len(ref_scores), -1, dtype=np.int64)
    candidates = iou.max(axis=1) > iou_threshold
    order = torch.argsort(ref_scores, descending=True, stable=True).numpy()
    for i in order[candidates[order]]:
        j = int(iou[i].argmax())
        if iou[i, j] > iou_threshold:
            claimed_by[i] = j
            iou[:, j] = -1.0
    return torch.from_numpy(claimed_by)


def nms_merge(predictions: Sequence[Prediction], iou_threshold: float, max_detections: int) -> Prediction:
    """Baseline TTA merge: the union of all augmentations' predictions, class-wise NMS, the top
    ``max_detections``.

    Boxes must already be in the original image's pixels. Returns a prediction dict sorted by score.
    """
    boxes = torch.cat([p["boxes"].double() for p in predictions])
    scores = torch.cat([p["scores"].double() for p in predictions])
    labels = torch.cat([p["labels"] for p in predictions])
    keep = batched_nms(boxes, scores, labels, iou_threshold)[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def merge(
    predictions: Sequence[Prediction],
    augmentations: Sequence[Augmentation],
    main: int,
    cfg: TTAConfig,
    how: str,
) -> Prediction:
    """One image's TTA predictions merged by ``how`` (``one_to_one`` or ``nms``) with ``cfg``'s settings."""
    if how == "one_to_one":
        merged = one_to_one_merge(
            predictions, [a.weight for a in augmentations], main, cfg.iou_threshold, cfg.score_mode
        )
        return {k: v[: cfg.max_detections] for k, v in merged.items()}
    if how == "nms":
        return nms_merge(predictions, cfg.nms_iou, cfg.max_detections)
    raise ValueError(f"unknown TTA merge {how!r}; expected 'one_to_one' or 'nms'")


TransformFor = Callable[[Augmentation], Callable[[Tensor, Target], tuple[Tensor, Target]]]
"""Augmentation -> a ``transform(image, target)`` in the data stage's convention: uint8
``tv_tensors.Image`` (3, H, W) and a target (``make_target``) in, normalised float image (3, h', w')
and the moved target out."""


@functools.lru_cache(maxsize=64)
def eval_transform_for(aug: Augmentation) -> EvalTransform:
    """The data stage's evaluation transform at ``aug``'s size and flip (the default :data:`TransformFor`)."""
    return eval_transform(aug.short_side, aug.max_size, aug.flip)


def transform_sample(
    transform_for: TransformFor, aug: Augmentation, image: Tensor, image_id: int, target: Target | None = None
) -> TransformedSample:
    """Apply ``aug`` to one original uint8 image (3, H, W) and its target (none: an empty one)."""
    height, width = int(image.shape[-2]), int(image.shape[-1])
    if target is None:
        target = make_target(
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.bool),
            height,
            width,
        )
    out_image, out_target = transform_for(aug)(tv_tensors.Image(image), target)
    return TransformedSample(out_image.as_subclass(Tensor), out_target, image_id, (height, width))


def detect(detector: nn.Module, samples: Sequence[TransformedSample]) -> tuple[Any, Batch, list[Prediction]]:
    """Collate ``samples`` (the data stage's padding) and run ``detector``: its raw outputs, the batch,
    and per-image predictions in each transformed image's own pixels (``postprocess`` with target sizes =
    the unpadded sizes), on the CPU."""
    batch = collate(samples)
    device = next(detector.parameters()).device
    outputs = detector(batch.images.to(device), batch.image_sizes.to(device))
    predictions = detector.postprocess(outputs, batch.image_sizes.to(device))
    return outputs, batch, [{k: v.detach().cpu() for k, v in p.items()} for p in predictions]


def to_original(predictions: Sequence[Prediction], batch: Batch, flip: bool) -> list[Prediction]:
    """Predictions made on a batch's transformed images, with boxes mapped back to the original images."""
    return [
        {**p, "boxes": invert_boxes(p["boxes"], orig.tolist(), size.tolist(), flip)}
        for p, orig, size in zip(predictions, batch.orig_sizes, batch.image_sizes)
    ]


@dataclass
class TTAOutput:
    """Per image: each augmentation's predictions in the original image's pixels, and each merge's result."""

    per_augmentation: dict[str, list[Prediction]]
    merged: dict[str, list[Prediction]]


class DetectorWithTTA(nn.Module):
    """A detector evaluated under several test-time augmentations whose boxes are inverted, then merged.

    For each augmentation, the original images are transformed (resized, maybe flipped, normalised; the
    data stage's eval transform by default), batched, detected, and each prediction's boxes are mapped
    back with :func:`invert_boxes` and rounded (:func:`~pipeline.evaluation.detections.quantize`); then
    every requested merge (:func:`merge`) combines the augmentations per image in float64. Rounding the
    merges' inputs, not only their outputs, keeps fp32 noise out of the merged boxes: an average of
    rounded values lands on a rounding boundary far more often than a single prediction does.
    """

    def __init__(
        self, detector: nn.Module, cfg: TTAConfig, transform_for: TransformFor = eval_transform_for
    ) -> None:
        super().__init__()
        self.detector = detector
        self.transform_for = transform_for
        self.cfg = cfg
        self.augmentations, self.main = augmentations_from_config(cfg)

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor]) -> TTAOutput:
        """images: original uint8 images (3, H_i, W_i). Returns a :class:`TTAOutput` for them."""
        per_aug: dict[str, list[Prediction]] = {}
        for aug in self.augmentations:
            samples = [transform_sample(self.transform_for, aug, image, i) for i, image in enumerate(images)]
            _, batch, predictions = detect(self.detector, samples)
            per_aug[aug.name] = [quantize(p) for p in to_original(predictions, batch, aug.flip)]
        merged = {
            how: [
                merge(
                    [per_aug[a.name][i] for a in self.augmentations],
                    self.augmentations,
                    self.main,
                    self.cfg,
                    how,
                )
                for i in range(len(images))
            ]
            for how in self.cfg.merges
        }
        return TTAOutput(per_augmentation=per_aug, merged=merged)
