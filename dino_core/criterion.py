"""Set-prediction losses: focal classification, L1 and GIoU boxes, on every supervised output.

Supervised outputs: the final decoder layer, every auxiliary layer, the encoder's selected proposals
(all after Hungarian matching) and the denoising queries of every layer (fixed assignment: each positive
query to the box it was made from; negatives and padding slots learn "no object").
Losses are summed over boxes and divided by ``num_boxes`` (the caller averages it over ranks).

Legend: B batch, Q queries, K classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dino_core.box_ops import cxcywh_to_xyxy
from dino_core.detector import DetectorOutput, Prediction
from dino_core.matcher import HungarianMatcher, Match


class SetCriterion(nn.Module):
    """DINO's training loss.

    Args:
        num_classes: K.
        matcher: the Hungarian matcher.
        weight_class, weight_bbox, weight_giou: loss weights (1, 5, 2).
        focal_alpha, focal_gamma: focal loss parameters (0.25, 2).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_class: float,
        weight_bbox: float,
        weight_giou: float,
        focal_alpha: float,
        focal_gamma: float,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"class": weight_class, "bbox": weight_bbox, "giou": weight_giou}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def prediction_losses(
        self,
        prediction: Prediction,
        targets: list[dict[str, torch.Tensor]],
        matches: list[Match],
        num_boxes: torch.Tensor | float,
    ) -> dict[str, torch.Tensor]:
        """Unweighted class/bbox/giou losses of one prediction set under a given assignment."""
        logits, boxes = prediction.logits.float(), prediction.boxes.float()
        batch = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
        query = torch.cat([q for q, _ in matches])
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matches)])
        target_boxes = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, matches)]).float()
        onehot = torch.zeros_like(logits).index_put(
            (batch, query, labels), torch.ones_like(labels, dtype=logits.dtype)
        )
        loss_class = (
            sigmoid_focal_loss(
                logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
            )
            / num_boxes
        )
        matched = boxes[batch, query]
        loss_bbox = F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes
        loss_giou = (
            generalized_box_iou_loss(cxcywh_to_xyxy(matched), cxcywh_to_xyxy(target_boxes), reduction="sum")
            / num_boxes
        )
        return {"class": loss_class, "bbox": loss_bbox, "giou": loss_giou}

    def forward(
        self,
        outputs: DetectorOutput,
        targets: list[dict[str, torch.Tensor]],
        num_boxes: torch.Tensor | float | None = None,
    ) -> dict[str, torch.Tensor]:
        """All loss terms, weighted, and their sum.

        Args:
            outputs: the detector's training output.
            targets: per image "labels" (n,) int64 and "boxes" (n, 4) cxcywh in [0, 1] (no crowd boxes).
            num_boxes: the normaliser, boxes per image summed over the batch and averaged over ranks
                (at least 1); defaults to this batch's box count.

        Returns:
            ``loss_{class,bbox,giou}{suffix}`` weighted terms, with suffix "" (final layer), ``_{i}``
            (auxiliary layer i), ``_enc`` (encoder proposals), ``_dn`` and ``_dn_{i}`` (denoising), and
            ``loss``, their sum.
        """
        counts = [len(t["labels"]) for t in targets]
        if num_boxes is None:
            num_boxes = float(max(sum(counts), 1))
        sets: list[tuple[str, Prediction]] = [("", outputs.final)]
        sets += [(f"_{i}", p) for i, p in enumerate(outputs.aux)]
        if outputs.encoder is not None:
            sets.append(("_enc", outputs.encoder))
        all_matches = self.matcher.match_many([(p.logits, p.boxes) for _, p in sets], targets)
        terms: dict[str, torch.Tensor] = {}
        for (suffix, prediction), matches in zip(sets, all_matches):
            for name, value in self.prediction_losses(prediction, targets, matches, num_boxes).items():
                terms[f"loss_{name}{suffix}"] = value * self.weights[name]
        if outputs.denoising is not None:
            dn = outputs.denoising
            pairs = dn.queries.positive_pairs(counts)
            dn_boxes = num_boxes * dn.queries.num_groups
            layers = [("_dn", dn.final)] + [(f"_dn_{i}", p) for i, p in enumerate(dn.aux)]
            for suffix, prediction in layers:
                for name, value in self.prediction_losses(prediction, targets, pairs, dn_boxes).items():
                    terms[f"loss_{name}{suffix}"] = value * self.weights[name]
        terms["loss"] = torch.stack(list(terms.values())).sum()
        return terms
