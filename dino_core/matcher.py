"""Hungarian matching of predictions to ground truth (costs: focal class 2, L1 5, GIoU 2).

Cost matrices of every prediction set of a step (final, auxiliary, encoder) are computed on the device
in one batched computation and moved to the host in one transfer; the assignment itself runs in scipy.

Legend: B batch, Q queries, K classes, n_b boxes of image b.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import generalized_box_iou

from dino_core.box_ops import cxcywh_to_xyxy

Match = tuple[torch.Tensor, torch.Tensor]
"""(query indices, target indices), int64, equal length."""


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU).

    Args:
        cost_class, cost_bbox, cost_giou: cost weights.
        focal_alpha, focal_gamma: the focal class cost's parameters.
    """

    def __init__(
        self,
        cost_class: float,
        cost_bbox: float,
        cost_giou: float,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def costs(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        """(..., B, Q, max n_b) cost of assigning each query to each of its image's boxes (padding columns
        unused).

        Args:
            logits: (..., B, Q, K), any leading dimensions (prediction sets); boxes: (..., B, Q, 4) cxcywh
                in [0, 1]; targets: per image "labels" (n_b,), "boxes" (n_b, 4).
        """
        max_n = max((len(t["labels"]) for t in targets), default=0)
        if max_n == 0:
            return logits.new_zeros(*logits.shape[:-1], 0)
        labels = pad_sequence([t["labels"] for t in targets], batch_first=True)
        target_boxes = pad_sequence(
            [t["boxes"].float() for t in targets], batch_first=True, padding_value=0.5
        )
        prob = logits.float().sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        index = labels[:, None, :].expand(*logits.shape[:-1], max_n)
        cost_class = torch.gather(positive - negative, -1, index)
        pred = boxes.float()
        cost_bbox = torch.cdist(pred, target_boxes.expand(*pred.shape[:-2], max_n, 4), p=1)
        giou = generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class - self.cost_giou * giou
        # Non-finite predictions still get an assignment; the training loop's guard skips such steps.
        return torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

    @torch.no_grad()
    def assign(
        self,
        predictions: list[tuple[torch.Tensor, torch.Tensor]],
        targets: list[dict[str, torch.Tensor]],
        num_valid: tuple[int, ...] | None = None,
    ) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """Assignments of several prediction sets (logits (B, Q, K), boxes (B, Q, 4)), on the host.

        Sets of one shape (in a training step: every decoder layer and the encoder proposals) get their
        costs in one batched computation and one device-to-host copy. ``num_valid``: per image, how many
        of its queries (the first ones) may be assigned; None: all.

        Returns:
            per prediction set, per image, (query indices, target indices) as int64 numpy arrays.
        """
        counts = [len(t["labels"]) for t in targets]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (logits, _) in enumerate(predictions):
            by_shape.setdefault(tuple(logits.shape), []).append(i)
        host: list[np.ndarray | None] = [None] * len(predictions)
        if max(counts, default=0) > 0:
            for members in by_shape.values():
                logits = torch.stack([predictions[i][0] for i in members])
                boxes = torch.stack([predictions[i][1] for i in members])
                for i, cost in zip(members, self.costs(logits, boxes, targets).cpu().numpy()):
                    host[i] = cost
        empty = np.zeros(0, dtype=np.int64)
        results = []
        for cost in host:
            assignments = []
            for i, n in enumerate(counts):
                if n == 0 or cost is None:
                    assignments.append((empty, empty))
                    continue
                queries = cost.shape[1] if num_valid is None else num_valid[i]
                rows, cols = linear_sum_assignment(np.ascontiguousarray(cost[i, :queries, :n]))
                assignments.append((rows.astype(np.int64), cols.astype(np.int64)))
            results.append(assignments)
        return results

    def match_many(
        self,
        predictions: list[tuple[torch.Tensor, torch.Tensor]],
        targets: list[dict[str, torch.Tensor]],
        num_valid: tuple[int, ...] | None = None,
    ) -> list[list[Match]]:
        """:meth:`assign` with the indices as tensors on the predictions' device."""
        device = predictions[0][0].device
        return [
            [
                (torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device))
                for rows, cols in assignments
            ]
            for assignments in self.assign(predictions, targets, num_valid)
        ]

    def forward(
        self,
        logits: torch.Tensor,
        boxes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        num_valid: tuple[int, ...] | None = None,
    ) -> list[Match]:
        """Match one set: logits (B, Q, K), boxes (B, Q, 4) -> per image (query idx, target idx); only
        the first ``num_valid[b]`` queries of image b when given."""
        return self.match_many([(logits, boxes)], targets, num_valid)[0]
