"""The deformable decoder with iterative box refinement and look-forward-twice (DINO section 3.5).

Each layer: self-attention among queries (masked for denoising), deformable cross-attention around the
query's anchor box, FFN. After each layer the shared box head refines the anchor in logit space; the
next layer starts from the refined box, detached. The box *predicted* by layer i is its delta added to
the refined box of layer i-1; with look-forward-twice that box is not detached, so layer i's loss also
trains layer i-1's refinement (Deformable DETR detaches it).

Legend: B batch, N queries (denoising + matching), S value tokens, L levels, C = d_model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dino_core.box_ops import inverse_sigmoid
from dino_core.deformable_attention import MSDeformAttn
from dino_core.heads import MLP
from dino_core.position_encoding import box_sine_encoding


class DecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention -> FFN, post-norm (official parameter names)."""

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
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, implementation=msda)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        self_attn_mask: torch.Tensor | None,
        query_padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """tgt, query_pos (B, N, C); reference_points (B, N, L, 4); memory (B, S, C) -> (B, N, C).

        self_attn_mask (N, N) and query_padding_mask (B, N) are bool, True where blocked.
        """
        q = tgt + query_pos
        attended = self.self_attn(
            q, q, tgt, attn_mask=self_attn_mask, key_padding_mask=query_padding_mask, need_weights=False
        )[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))


class Decoder(nn.Module):
    """A stack of decoder layers refining anchor boxes with a shared box head.

    Args:
        layer: the layer to clone.
        num_layers: depth.
        d_model: C.
        look_forward_twice: keep the gradient through the previous layer's refined box in predictions.
    """

    def __init__(self, layer: DecoderLayer, num_layers: int, d_model: int, look_forward_twice: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.look_forward_twice = look_forward_twice
        self.checkpointing = False

    def forward(
        self,
        tgt: torch.Tensor,
        anchors: torch.Tensor,
        memory: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        memory_padding_mask: torch.Tensor | None,
        self_attn_mask: torch.Tensor | None,
        query_padding_mask: torch.Tensor | None,
        box_head: nn.Module,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode.

        Args:
            tgt: (B, N, C) content queries.
            anchors: (B, N, 4) initial boxes in logit space.
            memory: (B, S, C) encoder output.
            valid_ratios: (B, L, 2) (w, h) share of each level's padded map covered by the image.
            self_attn_mask: (N, N) bool, True where blocked.
            query_padding_mask: (B, N) bool, True on queries no other query may attend to (an image's
                matching queries beyond its own tokens), or None.
            box_head: the shared head mapping a layer's output to a box delta in logit space.

        Returns:
            hidden: per layer (B, N, C), normalised; references: per layer the box (B, N, 4) in [0, 1]
            its prediction refines (the initial anchors for layer 0), detached unless look-forward-twice.
        """
        reference = anchors.sigmoid()
        references = [reference]
        hidden = []
        box_ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        for i, layer in enumerate(self.layers):
            # The positional query encodes the box in image coordinates (not the padded map's), so an
            # image's queries do not change with its batch's padding.
            query_pos = self.ref_point_head(box_sine_encoding(reference, self.d_model // 2).to(tgt.dtype))
            layer_input = reference[:, :, None] * box_ratios
            args = (
                tgt,
                query_pos,
                layer_input,
                memory,
                spatial_shapes,
                level_start_index,
                memory_padding_mask,
                self_attn_mask,
                query_padding_mask,
            )
            if self.checkpointing and self.training and torch.is_grad_enabled():
                tgt = checkpoint(layer, *args, use_reentrant=False)
            else:
                tgt = layer(*args)
            refined = (box_head(tgt) + inverse_sigmoid(reference)).sigmoid()
            hidden.append(self.norm(tgt))
            if i < len(self.layers) - 1:
                references.append(refined if self.look_forward_twice else refined.detach())
            reference = refined.detach()
        return hidden, references
