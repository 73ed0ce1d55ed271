"""``python -m pipeline model-info model=<preset>``: a model's parameter counts as one JSON object."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from dino_core import PRESETS, DINOConfig, build_dino, preset


@dataclass
class ModelInfoConfig:
    """Schema of ``conf/model_info.yaml``."""

    model: DINOConfig = field(default_factory=lambda: preset("dino_r50_4scale"))


def model_info(model: DINOConfig) -> dict[str, object]:
    """Parameter counts (total, trainable, per part) of the model ``model`` describes (on the meta device)."""
    with torch.device("meta"):
        detector = build_dino(model)
    parts: dict[str, int] = {}
    for name, parameter in detector.named_parameters():
        part = name.split(".")[0]
        parts[part] = parts.get(part, 0) + parameter.numel()
    return {
        "preset": next((name for name, cfg in PRESETS.items() if cfg == model), None),
        "backbone": model.backbone.name,
        "num_levels": model.num_levels,
        "num_classes": model.num_classes,
        "total_params": sum(p.numel() for p in detector.parameters()),
        "trainable_params": sum(p.numel() for p in detector.parameters() if p.requires_grad),
        "params_by_part": parts,
    }


def run(cfg: ModelInfoConfig) -> int:
    """Print the JSON object."""
    print(json.dumps(model_info(cfg.model)))
    return 0
