"""Post-processing: the top-k (query, class) pairs of each image as scored boxes in pixels."""

from __future__ import annotations

import torch

from dino_core.box_ops import cxcywh_to_xyxy


def postprocess(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    target_sizes: torch.Tensor,
    num_select: int,
    num_valid: tuple[int, ...] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Keep the ``num_select`` highest-scoring (query, class) pairs of each image.

    Args:
        logits: (B, Q, K) class logits.
        boxes: (B, Q, 4) cxcywh in [0, 1] of each image.
        target_sizes: (B, 2) (h, w) of the pixel frame the boxes are wanted in (the original image).
        num_select: k (capped at Q * K).
        num_valid: per image, how many of its queries (the first ones) to read; None: all Q.

    Returns:
        per image {"scores" (k,), "labels" (k,) int64 class index (= category id), "boxes" (k, 4) xyxy}.
    """
    if num_valid is not None:
        return [
            postprocess(logits[i : i + 1, :n], boxes[i : i + 1, :n], target_sizes[i : i + 1], num_select)[0]
            for i, n in enumerate(num_valid)
        ]
    b, q, k = logits.shape
    probs = logits.float().sigmoid().view(b, q * k)
    scores, index = torch.topk(probs, min(num_select, q * k), dim=1)
    query = torch.div(index, k, rounding_mode="floor")
    labels = index % k
    xyxy = torch.gather(cxcywh_to_xyxy(boxes.float()), 1, query[..., None].expand(-1, -1, 4))
    h, w = target_sizes.to(xyxy.device, torch.float32).unbind(1)
    xyxy = xyxy * torch.stack([w, h, w, h], dim=1)[:, None]
    return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, labels, xyxy)]
