"""The DINO detector as plain PyTorch: typed config, one builder, parts in modules named for what they own."""

from dino_core.builder import build_criterion, build_dino
from dino_core.config import BackboneConfig, DenoisingConfig, DINOConfig, LossConfig
from dino_core.presets import PRESETS, preset

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "DINOConfig",
    "DenoisingConfig",
    "LossConfig",
    "build_criterion",
    "build_dino",
    "preset",
]
