"""The one place that reads :class:`~dino_core.config.DINOConfig`: builds the detector and its loss."""

from __future__ import annotations

from torch import nn

from dino_core.backbone import Backbone
from dino_core.config import DINOConfig
from dino_core.criterion import SetCriterion
from dino_core.decoder import Decoder, DecoderLayer
from dino_core.deformable_attention import MSDeformAttn
from dino_core.detector import DINO
from dino_core.encoder import Encoder, EncoderLayer
from dino_core.matcher import HungarianMatcher
from dino_core.neck import Neck
from dino_core.query_selection import QuerySelection


def _xavier(*modules: nn.Module) -> None:
    # The official initialisation of the transformer: Xavier for every matrix, then each deformable
    # attention's own scheme.
    for module in modules:
        for parameter in module.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for sub in module.modules():
            if isinstance(sub, MSDeformAttn):
                sub.reset_parameters()


def build_dino(cfg: DINOConfig) -> DINO:
    """The detector described by ``cfg`` (random init; backbone weights are loaded by the caller)."""
    backbone = Backbone(
        cfg.backbone.name,
        num_stages=cfg.backbone_levels,
        frozen_stages=cfg.backbone.frozen_stages,
        drop_path_rate=cfg.backbone.drop_path_rate,
        norm=cfg.backbone.norm,
    )
    neck = Neck(backbone.num_channels, cfg.d_model, cfg.num_levels)
    encoder = Encoder(
        EncoderLayer(
            cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.num_levels, cfg.n_heads, cfg.enc_points, cfg.msda
        ),
        cfg.enc_layers,
    )
    decoder = Decoder(
        DecoderLayer(
            cfg.d_model, cfg.ffn_dim, cfg.dropout, cfg.num_levels, cfg.n_heads, cfg.dec_points, cfg.msda
        ),
        cfg.dec_layers,
        cfg.d_model,
        cfg.look_forward_twice,
    )
    query_selection = QuerySelection(cfg.query_selection, cfg.num_queries, cfg.d_model, cfg.num_classes)
    _xavier(encoder, decoder)
    for name in ("enc_output", "tgt_embed", "refpoint_embed"):
        if hasattr(query_selection, name):
            _xavier(getattr(query_selection, name))
    return DINO(
        backbone=backbone,
        neck=neck,
        encoder=encoder,
        query_selection=query_selection,
        decoder=decoder,
        num_classes=cfg.num_classes,
        d_model=cfg.d_model,
        pe_temperature=cfg.pe_temperature,
        denoising_mode=cfg.denoising.mode,
        denoising_queries=cfg.denoising.num_queries,
        box_noise=cfg.denoising.box_noise,
        label_noise=cfg.denoising.label_noise,
        num_select=cfg.num_select,
    )


def build_criterion(cfg: DINOConfig) -> SetCriterion:
    """The training loss (matcher and weights) described by ``cfg``."""
    loss = cfg.loss
    matcher = HungarianMatcher(
        loss.cost_class, loss.cost_bbox, loss.cost_giou, loss.focal_alpha, loss.focal_gamma
    )
    return SetCriterion(
        cfg.num_classes,
        matcher,
        weight_class=loss.weight_class,
        weight_bbox=loss.weight_bbox,
        weight_giou=loss.weight_giou,
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
    )
