"""Query selection: how the decoder's matching queries get their anchors and content (DINO section 3.4).

- ``static``: learned anchors and learned content, the same for every image;
- ``pure``: the top-K encoder proposals give the anchors and the (detached) selected features the content;
- ``mixed`` (DINO): anchors from the top-K proposals, content learned.

Legend: B batch, S flattened tokens, Q matching queries, C = d_model, K classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dino_core.heads import box_head, class_head


@dataclass
class SelectedQueries:
    """The matching queries handed to the decoder."""

    content: torch.Tensor
    """(B, Q, C) content queries."""
    anchors: torch.Tensor
    """(B, Q, 4) initial anchors (cx, cy, w, h) in logit space; detached for pure/mixed."""
    encoder_logits: torch.Tensor | None
    """(B, Q, K) class logits of the selected proposals (encoder loss), None for static."""
    encoder_boxes: torch.Tensor | None
    """(B, Q, 4) refined selected proposals in [0, 1], with gradient (encoder loss), None for static."""
    num_valid: tuple[int, ...] | None = None
    """Per image, how many of its Q queries (the first ones) come from its own tokens; None when all do.
    An image padded into a batch with fewer tokens of its own than Q would otherwise get padding tokens
    as queries, and its outputs would depend on the batch."""


def own_queries_mask(num_valid: tuple[int, ...], num_queries: int, device: torch.device) -> torch.Tensor:
    """(B, Q) bool, True on each image's own queries: the first ``num_valid[b]`` of image b's Q."""
    counts = torch.tensor(num_valid).to(device, non_blocking=True)
    return torch.arange(num_queries, device=device) < counts[:, None]


def encoder_proposals(
    memory: torch.Tensor,
    padding_mask: torch.Tensor | None,
    spatial_shapes: list[tuple[int, int]],
    valid_sizes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A box proposal per encoder token: its pixel centre with size 0.05 * 2^level.

    Args:
        memory: (B, S, C) encoder output.
        padding_mask: (B, S) True on padding, or None.
        spatial_shapes: per level (H_l, W_l).
        valid_sizes: (B, L, 2) each image's own (h_l, w_l).

    Returns:
        memory (B, S, C) zeroed where the proposal is unusable; proposals (B, S, 4) in logit space, +inf
        where unusable (padding, or a box too close to the border).
    """
    sizes = valid_sizes.to(torch.float32)
    proposals = []
    for level, (h, w) in enumerate(spatial_shapes):
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=torch.float32, device=memory.device),
            torch.arange(w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        centres = torch.stack((xs, ys), -1).view(1, h * w, 2) + 0.5
        centres = centres / sizes[:, level, None, :].flip(-1)  # divide x by w_l, y by h_l
        wh = torch.full_like(centres, 0.05 * (2.0**level))
        proposals.append(torch.cat((centres, wh), -1))
    boxes = torch.cat(proposals, 1)
    usable = ((boxes > 0.01) & (boxes < 0.99)).all(-1)
    if padding_mask is not None:
        usable = usable & ~padding_mask
    logits = torch.log(boxes / (1 - boxes)).masked_fill(~usable[..., None], float("inf"))
    return memory.masked_fill(~usable[..., None], 0.0), logits


class QuerySelection(nn.Module):
    """Produces the decoder's matching queries for one of the three query-selection modes.

    Args:
        mode: ``static`` | ``pure`` | ``mixed``.
        num_queries: Q.
        d_model: C.
        num_classes: K of the encoder's class head.
    """

    def __init__(self, mode: str, num_queries: int, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.mode, self.num_queries = mode, num_queries
        if mode != "static":
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.enc_class_head = class_head(d_model, num_classes)
            self.enc_box_head = box_head(d_model)
        if mode != "pure":
            self.tgt_embed = nn.Embedding(num_queries, d_model)
        if mode == "static":
            self.refpoint_embed = nn.Embedding(num_queries, 4)

    def forward(
        self,
        memory: torch.Tensor,
        padding_mask: torch.Tensor | None,
        spatial_shapes: list[tuple[int, int]],
        valid_sizes: torch.Tensor,
        image_tokens: tuple[int, ...] | None,
    ) -> SelectedQueries:
        """memory (B, S, C), padding_mask (B, S) or None, valid_sizes (B, L, 2), image_tokens (each image's
        own token count, None when no image is padded) -> the Q matching queries."""
        b = memory.shape[0]
        if self.mode == "static":
            return SelectedQueries(
                content=self.tgt_embed.weight[None].expand(b, -1, -1),
                anchors=self.refpoint_embed.weight[None].expand(b, -1, -1),
                encoder_logits=None,
                encoder_boxes=None,
            )
        memory, proposals = encoder_proposals(memory, padding_mask, spatial_shapes, valid_sizes)
        features = self.enc_output_norm(self.enc_output(memory))
        logits = self.enc_class_head(features)
        boxes = self.enc_box_head(features) + proposals
        scores = logits.max(-1).values
        if padding_mask is not None:
            # Padded tokens would tie with the border tokens; they must never take an image's slot.
            scores = scores.masked_fill(padding_mask, float("-inf"))
        # Sorted: an image's own tokens (finite scores) come before any padding token (-inf).
        top = torch.topk(scores, min(self.num_queries, scores.shape[1]), dim=1).indices  # (B, Q)
        num_valid = None
        if image_tokens is not None and min(image_tokens) < top.shape[1]:
            num_valid = tuple(min(n, top.shape[1]) for n in image_tokens)
        anchors = torch.gather(boxes, 1, top[..., None].expand(-1, -1, 4))
        selected = torch.gather(features, 1, top[..., None].expand(-1, -1, features.shape[-1]))
        if self.mode == "mixed":
            content = self.tgt_embed.weight[None].expand(b, -1, -1)[:, : top.shape[1]]
        else:
            content = selected.detach()
        return SelectedQueries(
            content=content,
            anchors=anchors.detach(),
            encoder_logits=torch.gather(logits, 1, top[..., None].expand(-1, -1, logits.shape[-1])),
            encoder_boxes=anchors.sigmoid(),
            num_valid=num_valid,
        )
