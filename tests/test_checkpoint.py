"""The model file contract: save/load round trip and refusals of files that are not what they claim."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from dino_core import build_dino, preset
from dino_core.config import config_to_dict
from pipeline.checkpoint import (
    ModelCard,
    load_card,
    load_checkpoint,
    load_model,
    read_weight_file,
    save_model,
)

CLASSES = [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}]


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_dino(preset("debug"))
    card = ModelCard(
        model=config_to_dict(preset("debug")), classes=CLASSES, step=7, epoch=1, stage="pretrain"
    )
    save_model(tmp_path / "run", model.state_dict(), card)
    return tmp_path / "run", model


def test_round_trip_gives_the_same_model(tmp_path: Path) -> None:
    directory, model = _saved(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["model.json", "model.safetensors"]
    loaded, card = load_model(directory)
    assert (
        card.step == 7 and card.class_names() == {1: "circle", 3: "square"} and card.config == preset("debug")
    )
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    same, _ = load_checkpoint(directory, preset("debug"))
    with pytest.raises(ValueError, match="another configuration"):
        load_checkpoint(directory, preset("dino_r50_4scale"))
    assert same is not None


def test_refuses_what_is_not_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a model directory"):
        load_card(tmp_path)
    (tmp_path / "model.json").write_text("{nope")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_card(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="is not a dino-pipeline/model-v1 model card"):
        load_card(tmp_path)
    directory, _ = _saved(tmp_path)
    card = json.loads((directory / "model.json").read_text())
    card["model"]["num_classes"] = 5
    (directory / "model.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match=r"does not match its model.json.*other shapes \['class_head.bias'"):
        load_model(directory)


def test_weight_files_are_read_without_unpickling_objects(tmp_path: Path) -> None:
    weights = {"a": torch.ones(2)}
    torch.save({"model": weights, "args": argparse.Namespace(lr=1.0)}, tmp_path / "ok.pth")
    assert torch.equal(read_weight_file(tmp_path / "ok.pth")["a"], torch.ones(2))

    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": weights, "evil": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights only"):
        read_weight_file(tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="does not exist"):
        read_weight_file(tmp_path / "missing.pth")
    torch.save({"model": weights}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="neither a model directory nor an official DINO checkpoint"):
        load_checkpoint(tmp_path / "plain.pth", preset("debug"))
