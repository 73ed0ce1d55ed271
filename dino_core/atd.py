"""ATD(k), the paper's Average Top-K Distance (eq. 1): how far the matching part's anchors are from the
ground-truth boxes they end up predicting.

Each ground-truth box is assigned a query by Hungarian matching of the final predictions (as in
training); its distance is the L1 norm between that query's initial anchor and the box (normalised
cx, cy, w, h). ATD(k) is the mean of the k largest distances over an evaluation set.
"""

from __future__ import annotations

import torch

from dino_core.detector import DetectorOutput
from dino_core.matcher import HungarianMatcher


@torch.no_grad()
def anchor_distances(
    outputs: DetectorOutput, targets: list[dict[str, torch.Tensor]], matcher: HungarianMatcher
) -> list[torch.Tensor]:
    """Per image, the L1 distances (n_b,) between each ground-truth box and its matched query's anchor.

    Args:
        outputs: the detector's output for a batch (its ``anchors`` (B, Q, 4) and final predictions).
        targets: per image "labels" (n_b,) and "boxes" (n_b, 4) cxcywh normalised to the image.
        matcher: the model's Hungarian matcher.
    """
    matches = matcher(outputs.final.logits, outputs.final.boxes, targets, outputs.num_valid)
    return [
        (outputs.anchors[b, queries].float() - t["boxes"][boxes].float()).abs().sum(-1)
        for b, ((queries, boxes), t) in enumerate(zip(matches, targets))
    ]


def average_top_k_distance(distances: torch.Tensor, k: int = 100) -> float:
    """ATD(k): the mean of the ``k`` largest of ``distances`` (N,); raises ValueError when N < k."""
    if distances.numel() < k:
        raise ValueError(f"ATD({k}) needs at least {k} matched boxes, got {distances.numel()}")
    return float(torch.topk(distances.flatten().double(), k).values.mean())
