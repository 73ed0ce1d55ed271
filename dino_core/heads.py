"""Prediction heads: the class logits and the box-delta MLP, and their DETR initialisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear layers with ReLU between them: (..., in_dim) -> (..., out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, [*dims[1:], out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def class_head(d_model: int, num_classes: int) -> nn.Linear:
    """Sigmoid classifier initialised to a 1% prior (focal-loss practice)."""
    head = nn.Linear(d_model, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))
    return head


def box_head(d_model: int) -> MLP:
    """3-layer MLP predicting a box delta in logit space, initialised to predict no change."""
    head = MLP(d_model, d_model, 4, 3)
    nn.init.constant_(head.layers[-1].weight, 0.0)
    nn.init.constant_(head.layers[-1].bias, 0.0)
    return head
