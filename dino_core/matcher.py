"""Hungarian matching of predictions to ground truth (costs: focal class 2, L1 5, GIoU 2).

Cost matrices of every prediction set of a step (final, auxiliary, encoder) are computed on the device
and moved to the host in one transfer; the assignment itself runs in scipy.

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
        """(B, Q, max n_b) cost of assigning each query to each of its image's boxes (padding columns unused).

        Args:
            logits: (B, Q, K); boxes: (B, Q, 4) cxcywh in [0, 1]; targets: per image "labels" (n_b,),
                "boxes" (n_b, 4).
        """
        q = logits.shape[1]
        max_n = max((len(t["labels"]) for t in targets), default=0)
        if max_n == 0:
            return logits.new_zeros(logits.shape[0], q, 0)
        labels = pad_sequence([t["labels"] for t in targets], batch_first=True)
        target_boxes = pad_sequence(
            [t["boxes"].float() for t in targets], batch_first=True, padding_value=0.5
        )
        prob = logits.float().sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        cost_class = torch.gather(positive - negative, 2, labels[:, None, :].expand(-1, q, -1))
        pred = boxes.float()
        cost_bbox = torch.cdist(pred, target_boxes, p=1)
        giou = generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class - self.cost_giou * giou
        # Non-finite predictions still get an assignment; the training loop's guard skips such steps.
        return torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)

    @torch.no_grad()
    def match_many(
        self, predictions: list[tuple[torch.Tensor, torch.Tensor]], targets: list[dict[str, torch.Tensor]]
    ) -> list[list[Match]]:
        """Match several prediction sets (logits (B, Q, K), boxes (B, Q, 4)) with one device-to-host copy.

        Returns:
            per prediction set, per image, the (query indices, target indices) of the assignment.
        """
        counts = [len(t["labels"]) for t in targets]
        device = predictions[0][0].device
        costs = [self.costs(logits, boxes, targets) for logits, boxes in predictions]
        if max(counts, default=0) == 0:
            host = [None] * len(costs)
        elif all(c.shape == costs[0].shape for c in costs):
            host = list(torch.stack(costs).cpu().numpy())
        else:
            host = [c.cpu().numpy() for c in costs]
        results = []
        for cost in host:
            matches = []
            for i, n in enumerate(counts):
                if n == 0:
                    empty = torch.zeros(0, dtype=torch.long, device=device)
                    matches.append((empty, empty))
                    continue
                rows, cols = linear_sum_assignment(np.ascontiguousarray(cost[i, :, :n]))
                matches.append(
                    (
                        torch.as_tensor(rows, dtype=torch.long, device=device),
                        torch.as_tensor(cols, dtype=torch.long, device=device),
                    )
                )
            results.append(matches)
        return results

    def forward(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> list[Match]:
        """Match one set: logits (B, Q, K), boxes (B, Q, 4) -> per image (query idx, target idx)."""
        return self.match_many([(logits, boxes)], targets)[0]
