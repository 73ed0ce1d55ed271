"""Helpers of the pipeline tests (imported by name: conftest puts this folder on sys.path)."""

from __future__ import annotations

import functools

import torch

from dino_core import DINOConfig, build_dino


@functools.cache
def meta_parameter_count(model: DINOConfig) -> int:
    """Build the detector ``model`` describes on the meta device (no memory, no init); its parameter count.

    Cached: many composed configs share a model.
    """
    with torch.device("meta"):
        detector = build_dino(model)
    return sum(p.numel() for p in detector.parameters())
