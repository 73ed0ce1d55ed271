"""Sine position encodings: of feature-map pixels (the encoder) and of boxes (the decoder's queries)."""

from __future__ import annotations

import math

import torch


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
    # (..., F) -> (..., F): sin of the even frequencies, cos of the odd ones, interleaved pairwise.
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_position_encoding(valid: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """Normalised 2-D sine encoding of every pixel of a padded feature map.

    Coordinates are cumulative counts over the valid region, normalised by the valid height/width and
    scaled to [0, 2 pi], so a pixel's encoding is the same whether its image is alone or padded.

    Args:
        valid: (B, H, W) bool, True on the image, False on padding.
        num_feats: features per axis (d_model / 2).
        temperature: frequency base (DINO: 20).

    Returns:
        (B, H, W, 2 * num_feats) fp32, y features then x features.
    """
    eps = 1e-6
    scale = 2 * math.pi
    y = valid.cumsum(1, dtype=torch.float32)
    x = valid.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    freqs = _frequencies(num_feats, temperature, valid.device)
    return torch.cat(
        (_interleave_sin_cos(y[..., None] / freqs), _interleave_sin_cos(x[..., None] / freqs)), dim=-1
    )


def box_sine_encoding(boxes: torch.Tensor, num_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine encoding of normalised boxes (or points) for the decoder's positional queries.

    Args:
        boxes: (..., 4) cx, cy, w, h in [0, 1] (or (..., 2) points).
        num_feats: features per coordinate (d_model / 2).

    Returns:
        (..., num_feats * boxes.shape[-1]) fp32 in the order y, x, w, h (the official layout).
    """
    freqs = _frequencies(num_feats, temperature, boxes.device)
    order = [1, 0, *range(2, boxes.shape[-1])]
    angles = (boxes.float() * (2 * math.pi))[..., order, None] / freqs  # (..., D, num_feats)
    return _interleave_sin_cos(angles).flatten(-2)
