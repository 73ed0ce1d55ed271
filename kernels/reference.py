"""Pure-PyTorch multi-scale deformable attention: the specification every fused kernel is tested against.

Legend (shapes):
    N   batch                     S   sum of H_l * W_l over levels (flattened value tokens)
    M   attention heads           D   channels per head
    Lq  queries                   L   feature levels
    P   sampling points per head and level

Semantics: for every query and head, bilinearly sample each level's value map at P points
(``grid_sample``, zero padding, ``align_corners=False``: location (0, 0) is the top-left corner of the
top-left pixel, (1, 1) the bottom-right corner of the bottom-right pixel) and sum the samples weighted
by the attention weights. Sampling locations are (x, y) in [0, 1] relative to each level's size; points
outside read zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the op accumulates in for inputs of ``dtype``: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``F.grid_sample``.

    Args:
        value: (N, S, M, D) fp64, fp32, fp16 or bf16.
        spatial_shapes: (L, 2) int64, (H_l, W_l) per level.
        level_start_index: (L,) int64, offset of each level in S (implied by ``spatial_shapes``).
        sampling_locations: (N, Lq, M, L, P, 2) (x, y) in [0, 1]; fp32 (fp64 with fp64 values).
        attention_weights: (N, Lq, M, L, P), already normalised (softmax over L * P).

    Returns:
        (N, Lq, M * D) in ``value.dtype``; accumulated in fp32 (fp64 for fp64 inputs).
    """
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    acc = compute_dtype(value.dtype)
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_levels = value.to(acc).split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations.to(acc) - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_map = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, P)
        sampled.append(
            F.grid_sample(value_map, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P)
    samples = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.to(acc).transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (samples * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(value.dtype)


def ms_deform_attn_from_logits_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_logits: torch.Tensor,
) -> torch.Tensor:
    """:func:`ms_deform_attn_reference` with the attention weights given as logits.

    attention_logits (N, Lq, M, L, P) in value's dtype; the weights are their softmax over the L * P points
    of each head. Returns (N, Lq, M * D) in ``value.dtype``.
    """
    weights = attention_logits.flatten(-2).softmax(-1).view_as(attention_logits)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, weights)
