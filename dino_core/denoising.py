"""(Contrastive) denoising queries (DN-DETR, DINO section 3.3), as pure functions.

Each ground-truth box gives, per group, a positive query (box noise below lambda_1, to be reconstructed)
and, for CDN, a negative query (noise between lambda_1 and lambda_2 = 2 lambda_1, to be rejected as
"no object"). A group holds 2 * max_boxes queries for CDN (max_boxes for DN): positives in its first
half, negatives in its second; images with fewer boxes leave zero-content padding slots.
The self-attention mask (True = blocked) keeps the matching queries from seeing any denoising query
(they would see the answers) and the groups from seeing each other; denoising queries see the matching part.

Legend: B batch, P denoising queries (groups x group size), Q matching queries, C = d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dino_core.box_ops import cxcywh_to_xyxy, inverse_sigmoid, xyxy_to_cxcywh


@dataclass
class DenoisingQueries:
    """The denoising part of a training batch's decoder queries."""

    content: torch.Tensor
    """(B, P, C) label embeddings of the (noised) labels, zeros in padding slots."""
    anchors: torch.Tensor
    """(B, P, 4) noised boxes in logit space (zeros, i.e. the centre box, in padding slots)."""
    attn_mask: torch.Tensor
    """(P + Q, P + Q) bool, True where attention is blocked."""
    num_groups: int
    max_boxes: int
    contrastive: bool

    @property
    def group_size(self) -> int:
        """Queries per group."""
        return self.max_boxes * (2 if self.contrastive else 1)

    @property
    def num_queries(self) -> int:
        """P."""
        return self.num_groups * self.group_size

    def positive_pairs(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(query indices, target indices), int64 on the host, of the positive queries of an image with
        ``count`` boxes across all groups."""
        targets = np.tile(np.arange(count, dtype=np.int64), self.num_groups)
        groups = np.repeat(np.arange(self.num_groups, dtype=np.int64), count)
        return groups * self.group_size + targets, targets


def denoising_attn_mask(
    num_denoising: int, group_size: int, num_matching: int, device: torch.device
) -> torch.Tensor:
    """(P + Q, P + Q) bool mask: matching queries do not see denoising ones, groups do not see each other."""
    total = num_denoising + num_matching
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[num_denoising:, :num_denoising] = True
    group = torch.arange(num_denoising, device=device) // group_size
    mask[:num_denoising, :num_denoising] = group[:, None] != group[None, :]
    return mask


def noise_boxes(boxes: torch.Tensor, negative: torch.Tensor, box_noise: float) -> torch.Tensor:
    """Move each corner of (N, 4) cxcywh boxes by up to ``box_noise`` x half its size.

    Positives move by a fraction in [0, lambda_1) of half the box size, negatives (``negative`` (N,) bool)
    by [lambda_1, 2 lambda_1), each corner coordinate in a random direction; the result is clipped to the
    image. Returns (N, 4) cxcywh.
    """
    corners = cxcywh_to_xyxy(boxes)
    half = boxes[:, 2:].repeat(1, 2) / 2
    sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
    magnitude = torch.rand_like(boxes) + negative[:, None].to(boxes.dtype)
    corners = (corners + sign * magnitude * half * box_noise).clamp(0.0, 1.0)
    return xyxy_to_cxcywh(corners)


def build_denoising_queries(
    targets: list[dict[str, torch.Tensor]],
    *,
    contrastive: bool,
    num_queries: int,
    box_noise: float,
    label_noise: float,
    num_classes: int,
    label_embedding: nn.Embedding,
    num_matching: int,
) -> DenoisingQueries | None:
    """Noised copies of the ground truth for a training batch.

    Args:
        targets: per image {"labels" (n,) int64, "boxes" (n, 4) cxcywh in [0, 1]}.
        contrastive: add a negative per positive (CDN) or not (DN).
        num_queries: positive queries per image to aim for; groups = max(1, num_queries // max boxes).
        box_noise: lambda_1.
        label_noise: a label is replaced by a random class with probability label_noise / 2.
        num_classes: K.
        label_embedding: class index -> content query (K + 1 rows).
        num_matching: Q, for the attention mask.

    Returns:
        The queries, or None when no image of the batch has a box.
    """
    counts = [len(t["labels"]) for t in targets]
    max_boxes = max(counts, default=0)
    if max_boxes == 0:
        return None
    device = targets[0]["boxes"].device
    groups = max(1, num_queries // max_boxes)
    copies = groups * (2 if contrastive else 1)
    labels = torch.cat([t["labels"] for t in targets]).repeat(copies)
    boxes = torch.cat([t["boxes"] for t in targets]).to(torch.float32).repeat(copies, 1)
    n = sum(counts)
    copy = torch.arange(copies, device=device).repeat_interleave(n)
    image = torch.cat(
        [torch.full((c,), i, device=device, dtype=torch.long) for i, c in enumerate(counts)]
    ).repeat(copies)
    index = torch.cat([torch.arange(c, device=device) for c in counts]).repeat(copies)
    slot = copy * max_boxes + index
    negative = (copy % 2 == 1) if contrastive else torch.zeros_like(copy, dtype=torch.bool)

    flip = torch.rand(labels.shape, device=device) < label_noise * 0.5
    labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    boxes = noise_boxes(boxes, negative, box_noise)

    total = groups * max_boxes * (2 if contrastive else 1)
    weight = label_embedding.weight
    content = torch.zeros(len(targets), total, weight.shape[1], dtype=weight.dtype, device=device)
    content = content.index_put((image, slot), label_embedding(labels))
    anchors = torch.zeros(len(targets), total, 4, device=device).index_put(
        (image, slot), inverse_sigmoid(boxes)
    )
    group_size = max_boxes * (2 if contrastive else 1)
    return DenoisingQueries(
        content=content,
        anchors=anchors,
        attn_mask=denoising_attn_mask(total, group_size, num_matching, device),
        num_groups=groups,
        max_boxes=max_boxes,
        contrastive=contrastive,
    )
