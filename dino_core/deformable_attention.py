"""Multi-scale deformable attention as a module (Deformable DETR), on ``kernels.ms_deform_attn``.

Legend: B batch, Lq queries, S flattened value tokens (sum of H_l * W_l), L levels, M heads,
P points per head and level, D = d_model / M.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` sampled locations per head and level around its reference.

    Args:
        d_model: channels of queries and values.
        n_levels: feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
        implementation: ``auto`` | ``reference`` | ``fused`` (see :func:`kernels.ms_deform_attn`).
    """

    def __init__(
        self, d_model: int, n_levels: int, n_heads: int, n_points: int, implementation: str = "auto"
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.implementation = implementation
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Offsets start on a ring of directions (one per head) at distances 1..P; uniform attention."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        value_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attend.

        Args:
            query: (B, Lq, d_model), positional embedding already added.
            reference_points: (B, Lq, L, 2) points or (B, Lq, L, 4) boxes (cx, cy, w, h), in [0, 1] of
                each level's padded map.
            value: (B, S, d_model).
            spatial_shapes: (L, 2) int64 (H_l, W_l); level_start_index: (L,) int64.
            value_padding_mask: (B, S) bool, True on padding (those values read as zero).

        Returns:
            (B, Lq, d_model).
        """
        b, lq, _ = query.shape
        m, lvl, p = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value)
        if value_padding_mask is not None:
            v = v.masked_fill(value_padding_mask[..., None], 0.0)
        v = v.view(b, v.shape[1], m, self.d_model // m)
        # Locations stay fp32 under autocast: a bf16 coordinate in [0, 1] is off by up to a third of a
        # pixel on a 167-pixel level.
        with torch.autocast(device_type=query.device.type, enabled=False):
            offsets = F.linear(
                query.float(), self.sampling_offsets.weight.float(), self.sampling_offsets.bias.float()
            ).view(b, lq, m, lvl, p, 2)
            refs = reference_points.float()
            if refs.shape[-1] == 2:
                normalizer = spatial_shapes.flip(-1).to(torch.float32)  # (L, 2) as (W, H)
                locations = refs[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
            elif refs.shape[-1] == 4:
                locations = refs[:, :, None, :, None, :2] + offsets / p * refs[:, :, None, :, None, 2:] * 0.5
            else:
                raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(refs.shape)}")
        weights = self.attention_weights(query).view(b, lq, m, lvl * p)
        weights = weights.float().softmax(-1).view(b, lq, m, lvl, p).to(v.dtype)
        out = kernels.ms_deform_attn(
            v, spatial_shapes, level_start_index, locations, weights, implementation=self.implementation
        )
        return self.output_proj(out)
