"""Set-prediction losses: focal classification, L1 and GIoU boxes, on every supervised output.

Supervised outputs: the final decoder layer, every auxiliary layer, the encoder's selected proposals
(all after Hungarian matching) and the denoising queries of every layer (fixed assignment: each positive
query to the box it was made from; negatives and padding slots learn "no object").
Losses are summed over boxes and divided by ``num_boxes`` (the caller averages it over ranks).

The prediction sets of one shape are stacked and scored together, and every set's matched indices reach
the device in one host-to-device copy: a step launches a few dozen loss kernels instead of a few per set
and layer (on a GPU, the host's kernel launches bound a DINO step; see benchmarks/RESULTS.md, Training).

Legend: S prediction sets, B batch, Q queries, K classes, M matched (query, box) pairs of all sets.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dino_core.box_ops import cxcywh_to_xyxy
from dino_core.detector import DetectorOutput, Prediction
from dino_core.matcher import HungarianMatcher
from dino_core.query_selection import own_queries_mask

LOSS_NAMES = ("class", "bbox", "giou")


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
        # On the module's device, so that a step copies no weights to it.
        self.register_buffer(
            "weight_vector", torch.tensor([self.weights[n] for n in LOSS_NAMES]), persistent=False
        )
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def stacked_losses(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        pairs: torch.Tensor,
        labels: torch.Tensor,
        target_boxes: torch.Tensor,
        normaliser: torch.Tensor | float,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unweighted class/bbox/giou losses of S prediction sets under given assignments.

        Args:
            logits: (S, B, Q, K); boxes: (S, B, Q, 4) cxcywh.
            pairs: (4, M) int64 rows (set, image, query, target), the target indexing ``labels`` and
                ``target_boxes``, the batch's targets concatenated: (N,) int64 and (N, 4) cxcywh.
            normaliser: the divisor of every sum.
            query_mask: (B, Q) bool, True on the queries the class loss counts; None: all.

        Returns:
            (S, 3) losses (class, bbox, giou) of each set.
        """
        logits, boxes = logits.float(), boxes.float()
        sets, image, query, target = pairs
        onehot = torch.zeros_like(logits).index_put_(
            (sets, image, query, labels[target]), torch.ones((), dtype=logits.dtype, device=logits.device)
        )
        focal = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma)
        if query_mask is not None:
            focal = focal.where(query_mask[:, :, None], 0.0)
        matched, wanted = boxes[sets, image, query], target_boxes[target].float()
        per_pair = torch.stack(
            [
                (matched - wanted).abs().sum(-1),
                generalized_box_iou_loss(cxcywh_to_xyxy(matched), cxcywh_to_xyxy(wanted)),
            ],
            1,
        )
        box_losses = per_pair.new_zeros(len(logits), 2).index_add_(0, sets, per_pair)
        return torch.cat([focal.flatten(1).sum(1, keepdim=True), box_losses], 1) / normaliser

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
        offsets = np.cumsum([0, *counts[:-1]])
        matching: list[tuple[str, Prediction]] = [("", outputs.final)]
        matching += [(f"_{i}", p) for i, p in enumerate(outputs.aux)]
        if outputs.encoder is not None:
            matching.append(("_enc", outputs.encoder))
        assignments = self.matcher.assign(
            [(p.logits, p.boxes) for _, p in matching], targets, outputs.num_valid
        )
        device = outputs.final.logits.device
        query_mask = None
        if outputs.num_valid is not None:
            query_mask = own_queries_mask(outputs.num_valid, outputs.final.logits.shape[1], device)
        # (suffixes, predictions, per set per image (query, target) on the host, normaliser, query mask)
        groups = [([s for s, _ in matching], [p for _, p in matching], assignments, num_boxes, query_mask)]
        if outputs.denoising is not None:
            dn = outputs.denoising
            layers = [dn.final, *dn.aux]
            positives = [dn.queries.positive_pairs(n) for n in counts]
            groups.append(
                (
                    ["_dn"] + [f"_dn_{i}" for i in range(len(dn.aux))],
                    layers,
                    [positives] * len(layers),
                    num_boxes * dn.queries.num_groups,
                    None,
                )
            )
        host = [_pair_rows(per_set, offsets) for _, _, per_set, _, _ in groups]
        sizes = [rows.shape[1] for rows in host]
        rows = torch.from_numpy(np.concatenate(host, 1))
        if device.type == "cuda":
            rows = rows.pin_memory()
        pairs = rows.to(device, non_blocking=True).split(sizes, 1)
        labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets])
        terms: dict[str, torch.Tensor] = {}
        totals = []
        for (suffixes, predictions, _, normaliser, mask), group_pairs in zip(groups, pairs):
            losses = self.stacked_losses(
                torch.stack([p.logits for p in predictions]),
                torch.stack([p.boxes for p in predictions]),
                group_pairs,
                labels,
                target_boxes,
                normaliser,
                mask,
            ) * self.weight_vector.to(device)
            values = iter(losses.flatten().unbind())
            for suffix in suffixes:
                for name in LOSS_NAMES:
                    terms[f"loss_{name}{suffix}"] = next(values)
            totals.append(losses.sum())
        terms["loss"] = torch.stack(totals).sum()
        return terms


def _pair_rows(per_set: list[list[tuple[np.ndarray, np.ndarray]]], offsets: np.ndarray) -> np.ndarray:
    """(4, M) int64 rows (set, image, query, target in the concatenated targets) of per-set assignments."""
    columns = [
        (np.full(len(q), s), np.full(len(q), b), q, t + offsets[b])
        for s, per_image in enumerate(per_set)
        for b, (q, t) in enumerate(per_image)
    ]
    if not columns:
        return np.zeros((4, 0), dtype=np.int64)
    return np.stack([np.concatenate(parts) for parts in zip(*columns)]).astype(np.int64)
