"""The deformable transformer encoder: every pixel of every level attends to sampled points of all levels.

Legend: B batch, S flattened tokens of all levels, L levels, C = d_model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dino_core.deformable_attention import MSDeformAttn


class EncoderLayer(nn.Module):
    """Deformable self-attention + FFN, post-norm (the official layer; parameter names kept)."""

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        dropout: float,
        n_levels: int,
        n_heads: int,
        n_points: int,
        msda: str,
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, implementation=msda)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2); padding_mask (B, S) or None -> (B, S, C)."""
        attended = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))


def encoder_reference_points(
    spatial_shapes: list[tuple[int, int]], valid_sizes: torch.Tensor
) -> torch.Tensor:
    """Pixel centres of every level as sampling references for every level.

    Args:
        spatial_shapes: per level (H_l, W_l) of the padded maps.
        valid_sizes: (B, L, 2) each image's own (h_l, w_l).

    Returns:
        (B, S, L, 2) (x, y): the centre in the image's normalised coordinates, scaled to each level's
        padded map (so it lands on the same image point at every level).
    """
    sizes = valid_sizes.to(torch.float32)
    per_level = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys = torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_sizes.device)
        xs = torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_sizes.device)
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(-1)[None] / sizes[:, None, level, 0]
        ref_x = ref_x.reshape(-1)[None] / sizes[:, None, level, 1]
        per_level.append(torch.stack((ref_x, ref_y), -1))
    refs = torch.cat(per_level, 1)  # (B, S, 2) image-normalised
    shapes = torch.tensor(spatial_shapes, dtype=torch.float32, device=valid_sizes.device)
    ratios = (sizes / shapes).flip(-1)  # (B, L, 2) as (w, h) ratios
    return refs[:, :, None] * ratios[:, None]


class Encoder(nn.Module):
    """A stack of deformable encoder layers."""

    def __init__(self, layer: EncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.checkpointing = False

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        reference_points: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2); padding_mask (B, S) -> memory (B, S, C)."""
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                src = checkpoint(
                    layer,
                    src,
                    pos,
                    reference_points,
                    spatial_shapes,
                    level_start_index,
                    padding_mask,
                    use_reentrant=False,
                )
            else:
                src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src
