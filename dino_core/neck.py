"""The neck: project backbone stages to ``d_model`` and add the extra stride-2 level.

GroupNorm statistics are taken over each image's own pixels only, and padding is zeroed after every
projection, so a level's features for an image do not depend on how much padding its batch added.
"""

from __future__ import annotations

import torch
from torch import nn


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics ignore padded pixels; equal to ``nn.GroupNorm`` without padding."""

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """x (B, C, H, W), valid (B, H, W) bool or None (no padding) -> (B, C, H, W), zero on padding."""
        if valid is None:
            return super().forward(x)
        b, c, h, w = x.shape
        weights = valid.to(torch.float32)[:, None, None]  # (B, 1, 1, H, W)
        grouped = x.float().view(b, self.num_groups, c // self.num_groups, h, w)
        count = weights.sum(dim=(2, 3, 4), keepdim=True) * (c // self.num_groups)
        mean = (grouped * weights).sum(dim=(2, 3, 4), keepdim=True) / count
        var = (((grouped - mean) ** 2) * weights).sum(dim=(2, 3, 4), keepdim=True) / count
        normed = ((grouped - mean) * torch.rsqrt(var + self.eps) * weights).view(b, c, h, w)
        return (normed * self.weight[:, None, None] + self.bias[:, None, None] * valid[:, None]).to(x.dtype)


class LevelProjection(nn.Module):
    """Conv + masked GroupNorm(32) taking one feature map to ``d_model`` channels."""

    def __init__(self, in_channels: int, d_model: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, d_model, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = MaskedGroupNorm(32, d_model)
        nn.init.xavier_uniform_(self.conv.weight, gain=1)
        nn.init.constant_(self.conv.bias, 0)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """x (B, C_in, H, W) zero on padding, valid (B, H', W') or None -> (B, d_model, H', W')."""
        return self.norm(self.conv(x), valid)


def valid_masks(valid_sizes: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Per level, the (B, H_l, W_l) bool mask of each image's own pixels from its (h_l, w_l)."""
    masks = []
    for level, (h, w) in enumerate(shapes):
        rows = (
            torch.arange(h, device=valid_sizes.device)[None, :, None] < valid_sizes[:, level, 0, None, None]
        )
        cols = (
            torch.arange(w, device=valid_sizes.device)[None, None, :] < valid_sizes[:, level, 1, None, None]
        )
        masks.append(rows & cols)
    return masks


class Neck(nn.Module):
    """Backbone stages -> ``num_levels`` maps of ``d_model`` channels (1x1 projections + 3x3/2 extra levels).

    Args:
        in_channels: channels of the backbone stages it receives, finest first.
        d_model: output channels.
        num_levels: total levels; levels beyond the backbone's are stride-2 convolutions, the first on
            the last backbone stage, the next ones on the previous extra level.
    """

    def __init__(self, in_channels: list[int], d_model: int, num_levels: int) -> None:
        super().__init__()
        projections = [LevelProjection(c, d_model, 1, 1) for c in in_channels]
        previous = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            projections.append(LevelProjection(previous, d_model, 3, 2))
            previous = d_model
        self.projections = nn.ModuleList(projections)
        self.num_backbone_levels = len(in_channels)

    def forward(
        self, features: list[torch.Tensor], valid_sizes: torch.Tensor, padded: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Project the backbone maps and add the extra levels.

        Args:
            features: per backbone stage (B, C_l, H_l, W_l), zero outside each image's map.
            valid_sizes: (B, num_backbone_levels, 2) each image's own (h_l, w_l), on the CPU.
            padded: whether any image of the batch is padded (otherwise masks are skipped).

        Returns:
            maps: per level (B, d_model, H_l, W_l); masks: per level (B, H_l, W_l) bool valid pixels, on the
            maps' device; valid_sizes: (B, num_levels, 2) on the CPU.
        """
        sizes = [valid_sizes[:, i] for i in range(valid_sizes.shape[1])]
        shapes = [tuple(f.shape[-2:]) for f in features]
        for _ in range(len(self.projections) - self.num_backbone_levels):
            # A 3x3 stride-2 convolution with padding 1 maps n pixels to ceil(n / 2).
            sizes.append(torch.div(sizes[-1] + 1, 2, rounding_mode="floor"))
            shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
        all_sizes = torch.stack(sizes, dim=1)
        masks = valid_masks(all_sizes.to(features[0].device), shapes)
        maps = []
        for level, projection in enumerate(self.projections):
            if level < self.num_backbone_levels:
                source = features[level]
            elif level == self.num_backbone_levels:
                source = features[-1]
            else:
                source = maps[-1]
            maps.append(projection(source, masks[level] if padded else None))
        return maps, masks, all_sizes
