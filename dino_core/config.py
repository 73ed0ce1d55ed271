"""Typed, validated configuration of the DINO detector.

Only :func:`dino_core.builder.build_dino` reads these; every module below it takes explicit arguments.
Defaults are the paper's (Table 8) and the official implementation's for the R50 4-scale model.
Values that can be derived (backbone channels, which backbone stages feed the neck, the negative
denoising noise bound) are derived, never stored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

QUERY_SELECTIONS = ("static", "pure", "mixed")
DENOISING_MODES = ("cdn", "dn", "none")
MSDA_IMPLEMENTATIONS = ("auto", "reference", "fused")
BACKBONE_NORMS = ("frozen_bn", "group_norm")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class BackboneConfig:
    """The image backbone: a timm architecture used with ``features_only``."""

    name: str = "resnet50"
    """timm architecture name, e.g. ``resnet50``, ``swin_large_patch4_window12_384``,
    ``swin_tiny_patch4_window7_224`` (tests), ``resnet18``."""
    frozen_stages: int = 1
    """The stem and the first ``frozen_stages`` stages get no gradient (-1: nothing frozen, 0: stem only).
    The official R50 freezes the stem and stage 1; its Swin trains everything."""
    drop_path_rate: float = 0.0
    """Stochastic depth of transformer backbones (the official Swin-L uses 0.2)."""
    norm: str = "frozen_bn"
    """Normalisation of ResNet backbones: ``frozen_bn`` (BatchNorm as a fixed affine map: the paper's,
    for ImageNet weights) or ``group_norm`` (trainable GroupNorm, up to 32 groups: for a backbone trained
    from scratch, which frozen random statistics leave unnormalised; the demo model's)."""

    def __post_init__(self) -> None:
        _require(bool(self.name), "model.backbone.name must name a timm architecture")
        _require(
            self.norm in BACKBONE_NORMS,
            f"model.backbone.norm must be one of {BACKBONE_NORMS}, got {self.norm!r}",
        )
        _require(
            self.norm == "frozen_bn" or self.name.startswith("resnet"),
            f"model.backbone.norm={self.norm} is for ResNet backbones; {self.name} has its own LayerNorms",
        )
        _require(
            -1 <= self.frozen_stages <= 4,
            f"model.backbone.frozen_stages must be in [-1, 4], got {self.frozen_stages}",
        )
        _require(
            0.0 <= self.drop_path_rate < 1.0,
            f"model.backbone.drop_path_rate must be in [0, 1), got {self.drop_path_rate}",
        )


@dataclass(frozen=True)
class DenoisingConfig:
    """(Contrastive) denoising training queries (DN-DETR, DINO section 3.3)."""

    mode: str = "cdn"
    """``cdn``: a positive and a negative query per ground-truth box; ``dn``: positives only; ``none``."""
    num_queries: int = 100
    """Positive denoising queries per image (CDN pairs); groups = num_queries // max boxes in the batch."""
    box_noise: float = 0.4
    """lambda_1: positives are moved by less than this (relative to box size); negatives lie between
    lambda_1 and lambda_2 = 2 * lambda_1."""
    label_noise: float = 0.5
    """Probability scale for flipping a denoising query's label (half of it is applied, as officially)."""

    def __post_init__(self) -> None:
        _require(
            self.mode in DENOISING_MODES,
            f"model.denoising.mode must be one of {DENOISING_MODES}, got {self.mode!r}",
        )
        _require(self.num_queries >= 1, f"model.denoising.num_queries must be >= 1, got {self.num_queries}")
        _require(
            0.0 < self.box_noise <= 1.0, f"model.denoising.box_noise must be in (0, 1], got {self.box_noise}"
        )
        _require(
            0.0 <= self.label_noise <= 1.0,
            f"model.denoising.label_noise must be in [0, 1], got {self.label_noise}",
        )

    @property
    def enabled(self) -> bool:
        """Whether training adds denoising queries."""
        return self.mode != "none"

    @property
    def negative_noise(self) -> float:
        """lambda_2, the outer bound of the negative queries' noise."""
        return 2.0 * self.box_noise


@dataclass(frozen=True)
class LossConfig:
    """Hungarian matching costs and loss weights (DINO Table 8)."""

    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    weight_class: float = 1.0
    weight_bbox: float = 5.0
    weight_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        _require(
            self.cost_class > 0 or self.cost_bbox > 0 or self.cost_giou > 0,
            "model.loss: at least one matching cost must be positive",
        )
        for name in ("cost_class", "cost_bbox", "cost_giou", "weight_class", "weight_bbox", "weight_giou"):
            _require(getattr(self, name) >= 0, f"model.loss.{name} must be >= 0")
        _require(
            0.0 < self.focal_alpha < 1.0, f"model.loss.focal_alpha must be in (0, 1), got {self.focal_alpha}"
        )
        _require(self.focal_gamma >= 0, f"model.loss.focal_gamma must be >= 0, got {self.focal_gamma}")


@dataclass(frozen=True)
class DINOConfig:
    """The whole detector: backbone, deformable encoder/decoder, query selection, denoising, losses."""

    num_classes: int = 91
    """Size of the classification head; class index == the dataset's category id (COCO: 91, O365: 366)."""
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_levels: int = 4
    """Feature levels seen by the transformer: the last ``num_levels - 1`` backbone stages plus one
    stride-2 convolution on the last stage (4-scale: strides 8-64, 5-scale: 4-64)."""
    d_model: int = 256
    n_heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.0
    enc_layers: int = 6
    dec_layers: int = 6
    enc_points: int = 4
    dec_points: int = 4
    num_queries: int = 900
    """Matching queries (top-K encoder proposals for pure/mixed query selection)."""
    query_selection: str = "mixed"
    """``static`` (learned anchors and content), ``pure`` (anchors and content from the top-K encoder
    features), ``mixed`` (anchors from the top-K, content learned: DINO)."""
    look_forward_twice: bool = True
    """Box predictions of layer i get gradients through layer i-1's refined boxes (DINO section 3.5)."""
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pe_temperature: float = 20.0
    """Temperature of the sine position encoding of the feature maps."""
    num_select: int = 300
    """Detections kept per image by post-processing (top-k over queries x classes)."""
    msda: str = "auto"
    """Multi-scale deformable attention implementation: ``auto`` (fused op when built), ``reference``,
    ``fused``."""

    def __post_init__(self) -> None:
        _require(self.num_classes >= 1, f"model.num_classes must be >= 1, got {self.num_classes}")
        _require(2 <= self.num_levels <= 5, f"model.num_levels must be in [2, 5], got {self.num_levels}")
        _require(self.n_heads >= 1, f"model.n_heads must be >= 1, got {self.n_heads}")
        _require(
            self.d_model % self.n_heads == 0,
            f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})",
        )
        _require(
            self.d_model % 32 == 0,
            f"model.d_model must be a multiple of 32 (GroupNorm(32) in the neck), got {self.d_model}",
        )
        _require(self.d_model % 4 == 0, "model.d_model must be a multiple of 4 (box sine embedding)")
        for name in (
            "ffn_dim",
            "enc_layers",
            "dec_layers",
            "enc_points",
            "dec_points",
            "num_queries",
            "num_select",
        ):
            _require(getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _require(
            self.query_selection in QUERY_SELECTIONS,
            f"model.query_selection must be one of {QUERY_SELECTIONS}, got {self.query_selection!r}",
        )
        _require(
            self.msda in MSDA_IMPLEMENTATIONS,
            f"model.msda must be one of {MSDA_IMPLEMENTATIONS}, got {self.msda!r}",
        )
        _require(self.pe_temperature > 0, f"model.pe_temperature must be > 0, got {self.pe_temperature}")

    @property
    def backbone_levels(self) -> int:
        """How many backbone stages feed the neck (the rest of the levels are extra convolutions)."""
        return self.num_levels - 1


def config_to_dict(cfg: DINOConfig) -> dict:
    """The config as plain JSON-able data (for model cards)."""
    return dataclasses.asdict(cfg)


def config_differences(theirs: DINOConfig, ours: DINOConfig, their_label: str) -> list[str]:
    """Every field where two configs differ, as ``model.<path>: <their_label> <value>, config <value>``
    (nested fields by their dotted path), for error messages that name what differs."""
    return _differences(dataclasses.asdict(theirs), dataclasses.asdict(ours), their_label, "model.")


def _differences(theirs: dict, ours: dict, label: str, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(theirs) | set(ours)):
        x, y = theirs.get(key), ours.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, label, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key}: {label} {x!r}, config {y!r}")
    return out


def config_from_dict(data: dict) -> DINOConfig:
    """Rebuild a :class:`DINOConfig` from :func:`config_to_dict` output; unknown keys raise ValueError."""
    return _from_dict(DINOConfig, data, "model")


def _from_dict(cls: type, data: dict, path: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(fields)}")
    nested = {BackboneConfig, DenoisingConfig, LossConfig}
    kwargs = {}
    for name, value in data.items():
        field_type = next((c for c in nested if c.__name__ == str(fields[name].type)), None)
        kwargs[name] = _from_dict(field_type, value, f"{path}.{name}") if field_type is not None else value
    return cls(**kwargs)
