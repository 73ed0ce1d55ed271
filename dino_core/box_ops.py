"""Box conversions and the inverse sigmoid used to refine boxes in logit space.

Boxes are ``(cx, cy, w, h)`` normalised to the image (the model's format) or ``(x1, y1, x2, y2)``
(absolute or normalised); torchvision.ops provides the IoU family.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) cx, cy, w, h -> (..., 4) x1, y1, x2, y2."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) x1, y1, x2, y2 -> (..., 4) cx, cy, w, h."""
    return box_convert(boxes, "xyxy", "cxcywh")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """logit(x) with x clamped to [0, 1] and both x and 1 - x floored at ``eps`` (the official bound)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
