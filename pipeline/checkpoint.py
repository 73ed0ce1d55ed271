"""The model file contract: ``model.safetensors`` (fp32 weights) + ``model.json`` (its card).

This is what a training stage leaves for the next stage and for users. Nothing here unpickles arbitrary
objects: our weights are safetensors, and official ``.pth`` files are read with ``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dino_core import DINOConfig, build_dino
from dino_core.config import config_from_dict, config_to_dict
from dino_core.detector import DINO
from dino_core.official import is_official_layout, load_official_state_dict
from pipeline.coco_categories import COCO_CATEGORIES

MODEL_FILE = "model.safetensors"
CARD_FILE = "model.json"
CARD_FORMAT = "dino-pipeline/model-v1"


@dataclass
class ModelCard:
    """What a model file is: its architecture, class table and provenance."""

    model: dict[str, Any]
    """The :class:`DINOConfig` as a dict."""
    classes: list[dict[str, Any]]
    """The class table: ``{"id": category id (= class index), "name": ...}`` per class."""
    step: int = 0
    epoch: int = 0
    stage: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    """Where the weights came from (a checkpoint directory, an official file, ...)."""
    ema: bool = False
    """Whether the weights are the exponential moving average."""
    format: str = CARD_FORMAT

    @property
    def config(self) -> DINOConfig:
        """The architecture as a validated config."""
        return config_from_dict(self.model)

    def class_names(self) -> dict[int, str]:
        """Category id -> name."""
        return {int(c["id"]): str(c["name"]) for c in self.classes}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def save_model(directory: Path, state_dict: Mapping[str, torch.Tensor], card: ModelCard) -> None:
    """Write ``model.safetensors`` (fp32, contiguous) then ``model.json`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in state_dict.items()
    }
    with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{MODEL_FILE}.", delete=False) as handle:
        temporary = Path(handle.name)
    save_file(tensors, str(temporary), metadata={"format": CARD_FORMAT})
    os.replace(temporary, directory / MODEL_FILE)
    atomic_write_bytes(directory / CARD_FILE, json.dumps(asdict(card), indent=2, sort_keys=True).encode())


def load_card(directory: Path) -> ModelCard:
    """Read ``model.json``; raises ValueError naming the file when it is missing or not a model card."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: {directory} is not a model directory (model.safetensors + model.json)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    found = data.get("format") if isinstance(data, dict) else None
    if found != CARD_FORMAT:
        raise ValueError(f"{path} is not a {CARD_FORMAT} model card (format {found!r})")
    known = set(ModelCard.__dataclass_fields__)
    card = ModelCard(**{k: v for k, v in data.items() if k in known})
    card.config  # noqa: B018 - validates the architecture now, naming the bad key
    return card


def load_model(directory: Path, device: torch.device | str = "cpu") -> tuple[DINO, ModelCard]:
    """Build the model a model directory describes and load its weights (eval mode)."""
    card = load_card(directory)
    model = build_dino(card.config)
    path = Path(directory) / MODEL_FILE
    try:
        state = load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path} does not match its {CARD_FILE}: missing {missing[:8]}, unexpected {unexpected[:8]}, "
            f"other shapes {mismatched[:8]}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a weight file: safetensors, or a ``.pth``/``.bin`` read with ``weights_only=True``.

    Understands the usual wrappers (``{"model": ...}``, ``{"state_dict": ...}``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"weight file {path} does not exist; give the path of a local file (nothing is downloaded)"
        )
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    try:
        # Official checkpoints carry their argparse namespace; it is the only non-tensor class allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several unrelated types for a bad or unsafe file
        raise ValueError(f"cannot read {path} as a PyTorch weight file (weights only): {error}") from None
    for key in ("model", "state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return data


def load_checkpoint(
    checkpoint: Path, model_config: DINOConfig | None, device: torch.device | str = "cpu"
) -> tuple[DINO, ModelCard]:
    """Load either one of our model directories or an official release ``.pth``.

    Args:
        checkpoint: a model directory (``model.json`` + ``model.safetensors``) or an official file.
        model_config: required for official files (their preset); for our directories, if given it must
            equal the card's architecture.

    Returns:
        The model in eval mode on ``device`` and its card (official files get a COCO card).
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        model, card = load_model(checkpoint, device)
        if model_config is not None and model_config != card.config:
            raise ValueError(
                f"{checkpoint} holds a model of another configuration than the one asked for; drop the "
                "model= override (the checkpoint's model.json defines its architecture)"
            )
        return model, card
    state = read_weight_file(checkpoint)
    if not is_official_layout(state):
        raise ValueError(
            f"{checkpoint} is neither a model directory nor an official DINO checkpoint "
            "(no transformer./backbone.0. keys)"
        )
    if model_config is None:
        raise ValueError(
            f"{checkpoint} is an official checkpoint: name its preset, e.g. model=dino_r50_4scale"
        )
    model = build_dino(model_config)
    load_official_state_dict(model, state, source=str(checkpoint))
    card = ModelCard(
        model=config_to_dict(model_config), classes=COCO_CATEGORIES, stage="official", source=str(checkpoint)
    )
    return model.to(device).eval(), card
