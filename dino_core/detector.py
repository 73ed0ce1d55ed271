"""DINO: backbone -> neck -> deformable encoder -> query selection (+ denoising) -> decoder -> heads.

The forward is split by phase (``features``, ``encode``, ``select_queries``, ``decode``, ``heads``).

Legend: B batch, H x W padded image, L levels, S flattened tokens of all levels, Q matching queries,
P denoising queries, K classes, C = d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dino_core.backbone import Backbone
from dino_core.box_ops import inverse_sigmoid
from dino_core.decoder import Decoder
from dino_core.denoising import DenoisingQueries, build_denoising_queries
from dino_core.encoder import Encoder, encoder_reference_points
from dino_core.heads import box_head, class_head
from dino_core.neck import Neck
from dino_core.position_encoding import sine_position_encoding
from dino_core.postprocess import postprocess
from dino_core.query_selection import QuerySelection, SelectedQueries, own_queries_mask


@dataclass
class Prediction:
    """One set of predictions."""

    logits: torch.Tensor
    """(B, N, K) class logits."""
    boxes: torch.Tensor
    """(B, N, 4) cx, cy, w, h in [0, 1] of each image (not of the padded batch)."""


@dataclass
class DenoisingOutput:
    """Predictions of the denoising queries (training only)."""

    final: Prediction
    aux: list[Prediction]
    queries: DenoisingQueries


@dataclass
class DetectorOutput:
    """Everything the forward returns."""

    final: Prediction
    """The last decoder layer's predictions for the Q matching queries."""
    aux: list[Prediction]
    """The earlier decoder layers' predictions (first layer first)."""
    encoder: Prediction | None
    """The selected encoder proposals (None for static query selection)."""
    anchors: torch.Tensor
    """(B, Q, 4) the matching queries' initial anchors in [0, 1] (for ATD)."""
    denoising: DenoisingOutput | None
    num_valid: tuple[int, ...] | None = None
    """Per image, how many of the Q matching queries (the first ones) are its own; the rest exist only
    because a larger image shares the batch: matching, losses and post-processing ignore them. None: all."""


@dataclass
class EncodedImages:
    """The encoder's output and the geometry needed to read it."""

    memory: torch.Tensor
    """(B, S, C)."""
    padding_mask: torch.Tensor | None
    """(B, S) True on padding; None when no image is padded."""
    spatial_shapes: list[tuple[int, int]]
    spatial_shapes_tensor: torch.Tensor
    """(L, 2) int64."""
    level_start_index: torch.Tensor
    """(L,) int64."""
    valid_sizes: torch.Tensor
    """(B, L, 2) each image's own (h_l, w_l)."""
    valid_ratios: torch.Tensor
    """(B, L, 2) (w, h) share of each padded level map covered by the image."""
    image_tokens: tuple[int, ...] | None = None
    """(B,) tokens inside each image's own area; None when no image is padded."""


def validate_inputs(images: torch.Tensor, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
    """Check a batch and return its image sizes as Python ints; raises ValueError naming the problem."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised), got {images.dtype}")
    if tuple(image_sizes.shape) != (images.shape[0], 2):
        raise ValueError(f"image_sizes must be ({images.shape[0]}, 2), got {tuple(image_sizes.shape)}")
    sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
    height, width = images.shape[-2:]
    for i, (h, w) in enumerate(sizes):
        if not (1 <= h <= height and 1 <= w <= width):
            raise ValueError(f"image_sizes[{i}] = ({h}, {w}) is outside the padded batch ({height}, {width})")
    return sizes


def validate_targets(targets: list[dict[str, torch.Tensor]], batch_size: int, num_classes: int) -> None:
    """Check training targets (one host sync); raises ValueError naming the image and the problem."""
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} targets for {batch_size} images")
    checks = []
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise ValueError(f"targets[{i}] must have 'labels' and 'boxes', got keys {sorted(t)}")
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(
                f"targets[{i}]: boxes must be (n, 4) and labels (n,), "
                f"got {tuple(boxes.shape)} and {tuple(labels.shape)}"
            )
        if labels.dtype != torch.int64:
            raise ValueError(f"targets[{i}]['labels'] must be int64 class indices, got {labels.dtype}")
        checks.append(
            torch.stack(
                [
                    (~torch.isfinite(boxes)).any(),
                    (boxes[:, 2:] <= 0).any(),
                    ((boxes[:, :2] < 0) | (boxes[:, :2] > 1) | (boxes[:, 2:] > 1)).any(),
                    ((labels < 0) | (labels >= num_classes)).any(),
                ]
            )
        )
    if not checks:
        return
    bad = torch.stack(checks).cpu()
    problems = [
        "non-finite boxes",
        "boxes with zero or negative size",
        "boxes outside [0, 1]",
        f"labels outside [0, {num_classes})",
    ]
    for i, row in enumerate(bad.tolist()):
        for problem, flag in zip(problems, row):
            if flag:
                raise ValueError(
                    f"targets[{i}] has {problem}; boxes must be normalised cx, cy, w, h of non-empty boxes "
                    "and "
                    f"labels class indices below model.num_classes = {num_classes}"
                )


class DINO(nn.Module):
    """The DINO detector.

    Args:
        backbone, neck, encoder, query_selection, decoder: the parts (see their modules).
        num_classes: K.
        d_model: C.
        pe_temperature: temperature of the feature-map sine encoding.
        denoising_mode: ``cdn`` | ``dn`` | ``none``.
        denoising_queries: positive denoising queries per image to aim for.
        box_noise: lambda_1.
        label_noise: label flip scale.
        num_select: detections kept per image by :meth:`postprocess`.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        neck: Neck,
        encoder: Encoder,
        query_selection: QuerySelection,
        decoder: Decoder,
        num_classes: int,
        d_model: int,
        pe_temperature: float,
        denoising_mode: str,
        denoising_queries: int,
        box_noise: float,
        label_noise: float,
        num_select: int,
    ) -> None:
        super().__init__()
        self.backbone, self.neck, self.encoder = backbone, neck, encoder
        self.query_selection, self.decoder = query_selection, decoder
        self.num_classes, self.d_model, self.pe_temperature = num_classes, d_model, pe_temperature
        self.denoising_mode, self.denoising_queries = denoising_mode, denoising_queries
        self.box_noise, self.label_noise, self.num_select = box_noise, label_noise, num_select
        num_levels = len(neck.projections)
        self.level_embed = nn.Parameter(torch.empty(num_levels, d_model))
        nn.init.normal_(self.level_embed)
        self.class_head = class_head(d_model, num_classes)
        self.box_head = box_head(d_model)
        # Row K is never a label; it exists so official checkpoints (91 + 1 rows) load unchanged.
        self.label_enc = nn.Embedding(num_classes + 1, d_model)

    def set_activation_checkpointing(self, *, backbone: bool, encoder: bool, decoder: bool) -> None:
        """Recompute backbone stages / encoder layers / decoder layers in the backward pass."""
        self.backbone.checkpointing = backbone
        self.encoder.checkpointing = encoder
        self.decoder.checkpointing = decoder

    def encode(self, images: torch.Tensor, image_sizes: torch.Tensor) -> EncodedImages:
        """Backbone, neck and encoder: images (B, 3, H, W), image_sizes (B, 2) (h, w) -> encoded tokens."""
        sizes = validate_inputs(images, image_sizes)
        padded = any(s != tuple(images.shape[-2:]) for s in sizes)
        features, backbone_sizes = self.backbone(images, image_sizes)
        maps, masks, valid_sizes = self.neck(features, backbone_sizes, padded)
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1)
        pos = torch.cat(
            [
                sine_position_encoding(mask, self.d_model // 2, self.pe_temperature).flatten(1, 2)
                + self.level_embed[i]
                for i, mask in enumerate(masks)
            ],
            1,
        ).to(src.dtype)
        padding_mask = ~torch.cat([m.flatten(1) for m in masks], 1) if padded else None
        device = src.device
        image_tokens = tuple(valid_sizes.prod(-1).sum(-1).tolist()) if padded else None
        shapes_tensor = torch.as_tensor(shapes, dtype=torch.long, device=device)
        starts = [0]
        for h, w in shapes[:-1]:
            starts.append(starts[-1] + h * w)
        start = torch.as_tensor(starts, dtype=torch.long, device=device)
        valid_sizes = valid_sizes.to(device)
        ratios = (valid_sizes.to(torch.float32) / shapes_tensor.to(torch.float32)).flip(-1)
        refs = encoder_reference_points(shapes, valid_sizes)
        memory = self.encoder(src, pos, shapes_tensor, start, refs, padding_mask)
        return EncodedImages(
            memory, padding_mask, shapes, shapes_tensor, start, valid_sizes, ratios, image_tokens
        )

    def select_queries(self, encoded: EncodedImages) -> SelectedQueries:
        """The Q matching queries (see :mod:`dino_core.query_selection`)."""
        return self.query_selection(
            encoded.memory,
            encoded.padding_mask,
            encoded.spatial_shapes,
            encoded.valid_sizes,
            encoded.image_tokens,
        )

    def prepare_denoising(
        self, targets: list[dict[str, torch.Tensor]] | None, num_matching: int
    ) -> DenoisingQueries | None:
        """The denoising queries of a training batch (None in eval, without targets or boxes, or when off)."""
        if not self.training or targets is None or self.denoising_mode == "none":
            return None
        return build_denoising_queries(
            targets,
            contrastive=self.denoising_mode == "cdn",
            num_queries=self.denoising_queries,
            box_noise=self.box_noise,
            label_noise=self.label_noise,
            num_classes=self.num_classes,
            label_embedding=self.label_enc,
            num_matching=num_matching,
        )

    def decode(
        self, encoded: EncodedImages, queries: SelectedQueries, denoising: DenoisingQueries | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Decode [denoising queries, matching queries]: per layer hidden (B, P + Q, C) and boxes."""
        content, anchors, mask = queries.content, queries.anchors, None
        query_padding = None
        if queries.num_valid is not None:
            query_padding = ~own_queries_mask(queries.num_valid, content.shape[1], content.device)
        if denoising is not None:
            content = torch.cat([denoising.content.to(content.dtype), content], 1)
            anchors = torch.cat([denoising.anchors, anchors], 1)
            mask = denoising.attn_mask
            if query_padding is not None:
                query_padding = torch.cat(
                    [query_padding.new_zeros(len(content), denoising.num_queries), query_padding], 1
                )
        return self.decoder(
            content,
            anchors,
            encoded.memory,
            encoded.spatial_shapes_tensor,
            encoded.level_start_index,
            encoded.valid_ratios,
            encoded.padding_mask,
            mask,
            query_padding,
            self.box_head,
        )

    def heads(
        self,
        hidden: list[torch.Tensor],
        references: list[torch.Tensor],
        queries: SelectedQueries,
        denoising: DenoisingQueries | None,
    ) -> DetectorOutput:
        """Class and box predictions of every layer, split into denoising and matching parts."""
        if denoising is None:
            # Keeps the label embedding in the graph when a batch has no denoising queries: every
            # parameter must get a gradient on every step for ZeRO's reductions.
            hidden = [hidden[0] + self.label_enc.weight[0, 0] * 0.0, *hidden[1:]]
        # The heads are shared by the layers: one call on all layers launches a sixth of the kernels.
        stacked = torch.stack(hidden)
        logits = self.class_head(stacked)
        boxes = (self.box_head(stacked) + inverse_sigmoid(torch.stack(references))).sigmoid()
        split = denoising.num_queries if denoising is not None else 0

        def per_layer(queries: slice) -> list[Prediction]:
            return [
                Prediction(lg, bx)
                for lg, bx in zip(logits[:, :, queries].unbind(), boxes[:, :, queries].unbind())
            ]

        matching = per_layer(slice(split, None))
        dn_output = None
        if denoising is not None:
            dn_layers = per_layer(slice(None, split))
            dn_output = DenoisingOutput(final=dn_layers[-1], aux=dn_layers[:-1], queries=denoising)
        encoder = None
        if queries.encoder_logits is not None and queries.encoder_boxes is not None:
            encoder = Prediction(queries.encoder_logits, queries.encoder_boxes)
        return DetectorOutput(
            final=matching[-1],
            aux=matching[:-1],
            encoder=encoder,
            anchors=queries.anchors.sigmoid(),
            denoising=dn_output,
            num_valid=queries.num_valid,
        )

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> DetectorOutput:
        """Detect.

        Args:
            images: (B, 3, H, W) normalised, zero-padded right/bottom.
            image_sizes: (B, 2) int64 (h, w) of each image before padding.
            targets: training only, per image "labels" (n,) int64 (< K) and "boxes" (n, 4) cx, cy, w, h in
                [0, 1] of the image; they shape the denoising queries.

        Returns:
            the predictions (see :class:`DetectorOutput`).
        """
        if targets is not None:
            validate_targets(targets, images.shape[0] if images.dim() == 4 else -1, self.num_classes)
        encoded = self.encode(images, image_sizes)
        queries = self.select_queries(encoded)
        denoising = self.prepare_denoising(targets, queries.anchors.shape[1])
        hidden, references = self.decode(encoded, queries, denoising)
        return self.heads(hidden, references, queries, denoising)

    def postprocess(
        self, outputs: DetectorOutput, target_sizes: torch.Tensor
    ) -> list[dict[str, torch.Tensor]]:
        """Top ``num_select`` detections per image, boxes xyxy in the pixels of target_sizes (B, 2) (h, w)."""
        return postprocess(
            outputs.final.logits, outputs.final.boxes, target_sizes, self.num_select, outputs.num_valid
        )
