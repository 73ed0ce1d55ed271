"""The training stage refuses bad input with an error naming it and the fix, before it launches anything:
a finished run rerun with other settings, checkpoints of other data, an LR drop the run never reaches, a
damaged checkpoint. Built from tiny files; nothing trains."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch

import pipeline.train.stage as stage
from dino_core.config import config_to_dict
from dino_core.presets import preset
from pipeline.config import ConfigError, compose, validate
from pipeline.tracking_config import TrackingConfig
from pipeline.train.checkpointing import (
    CheckpointDir,
    CheckpointError,
    IncompatibleRunError,
    TrainState,
    check_same_run,
    step_tag,
)
from pipeline.train.config import LauncherConfig, TrainConfig, TrainStageConfig
from pipeline.train.loop import Trainer

STEPS = 2


def _config(data: Path, out: Path, **train: object) -> TrainStageConfig:
    return TrainStageConfig(
        model=preset("debug"),
        data=str(data),
        out=out,
        train=TrainConfig(**{"epochs": 1, "max_steps": STEPS, "num_workers": 0, **train}),
        launcher=LauncherConfig(kind="single"),
        tracking=TrackingConfig(kind="none"),
    )


def _state(step: int, **fields: object) -> TrainState:
    """The train state of a one-rank, one-image-per-step run at ``step`` (8 batches an epoch)."""
    values: dict[str, object] = {"stage": "pretrain", "seed": 42, "model": {}, "classes": [], **fields}
    return TrainState(
        global_step=step,
        epoch=0,
        batch_in_epoch=step,
        micro_batches=step,
        skipped_nonfinite=0,
        world_size=1,
        batch_size=1,
        num_workers=0,
        grad_accumulation=1,
        batches_per_epoch=8,
        zero_stage=0,
        **values,
    )


def _stand_in_files(checkpoints: CheckpointDir, tag: str) -> None:
    """Small stand-ins for DeepSpeed's model states and one rank's state in checkpoint ``tag``."""
    (checkpoints.root / tag).mkdir(parents=True)
    torch.save({"module": {"w": torch.arange(4096.0)}}, checkpoints.root / tag / "mp_rank_00_model_states.pt")
    checkpoints.write_rank_state(tag, 0, {"rng": {}, "meter": {}})


def _checkpoint(cfg: TrainStageConfig, step: int = STEPS) -> TrainState:
    """A checkpoint of ``cfg``'s run at ``step`` with small stand-ins for DeepSpeed's files; it is latest."""
    plan = stage.plan_data(cfg)
    model = dataclasses.replace(cfg.model, num_classes=plan.num_classes)
    state = _state(
        step, stage=cfg.stage, seed=cfg.train.seed, model=config_to_dict(model), classes=plan.classes
    )
    checkpoints = CheckpointDir(cfg.out)
    tag = step_tag(step)
    _stand_in_files(checkpoints, tag)
    checkpoints.write_state(tag, state)
    (checkpoints.root / "latest").write_text(tag)
    return state


def _finished(cfg: TrainStageConfig) -> None:
    """``cfg``'s run finished: its last checkpoint and the completion record the stage writes."""
    _checkpoint(cfg)
    record = {
        "model_dir": str(cfg.out),
        "stage": cfg.stage,
        "steps": STEPS,
        "epoch": 0,
        "checkpoint": str(CheckpointDir(cfg.out).root / step_tag(STEPS)),
        "settings": cfg.result_settings(),
    }
    (Path(cfg.out) / "train_result.json").write_text(json.dumps(record))


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[TrainStageConfig]:
    """The configs the stage launched workers for (none are started)."""
    calls: list[TrainStageConfig] = []

    def fake_launch(cfg, worker):
        calls.append(cfg)
        return types.SimpleNamespace(steps=0, model_dir=str(cfg.out))

    monkeypatch.setattr(stage, "launch", fake_launch)
    return calls


# ---- 1. a finished run rerun with other settings --------------------------------------------------------


def test_finished_run_with_another_lr_is_refused_naming_it(demo_shards, tmp_path, launched, capsys) -> None:
    cfg = _config(demo_shards["pretrain/train"], tmp_path / "out", lr=1e-4)
    _finished(cfg)
    changed = _config(demo_shards["pretrain/train"], tmp_path / "out", lr=1e-3, log_every=7)
    assert stage.run(changed) == 2
    error = capsys.readouterr().err
    assert "train.lr: finished run 0.0001, config 0.001" in error
    assert "log_every" not in error  # bookkeeping is not a difference
    assert "new out=" in error and "finished run's settings" in error
    assert launched == []  # refused before any worker starts
    # The same settings (bookkeeping aside): finished, nothing refused.
    assert stage.run(_config(demo_shards["pretrain/train"], tmp_path / "out", lr=1e-4, log_every=7)) == 0


def test_finished_run_with_other_eval_data_is_refused(demo_shards, tmp_path, launched, capsys) -> None:
    cfg = _config(demo_shards["pretrain/train"], tmp_path / "out")
    _finished(cfg)
    changed = dataclasses.replace(cfg, val_data=str(demo_shards["pretrain/val"]))
    assert stage.run(changed) == 2
    assert "val_data: finished run None, config '" in capsys.readouterr().err
    assert launched == []


def test_longer_run_of_a_finished_one_is_a_resume(demo_shards, tmp_path, launched) -> None:
    cfg = _config(demo_shards["pretrain/train"], tmp_path / "out")
    _finished(cfg)
    longer = _config(demo_shards["pretrain/train"], tmp_path / "out", max_steps=STEPS + 2, lr=1e-3)
    assert stage.run(longer) == 0
    assert launched == [longer]  # not finished under this config: it continues (with the new lr)


# ---- 2. checkpoints of other data name data=, not model= ------------------------------------------------


def test_checkpoints_of_other_data_name_the_data(demo_shards, tmp_path, launched, capsys) -> None:
    _checkpoint(_config(demo_shards["pretrain/train"], tmp_path / "out"))
    other_data = _config(demo_shards["finetune/train"], tmp_path / "out")
    assert stage.run(other_data) == 2
    error = capsys.readouterr().err
    assert "another class table" in error and "data=" in error
    assert "id 1: checkpoint 'red circle', data 'purple star'" in error
    assert "model=" not in error and "another model" not in error
    assert launched == []


def test_checkpoints_of_another_model_and_data_name_both() -> None:
    debug = preset("debug")
    saved = _state(
        2,
        model=config_to_dict(dataclasses.replace(debug, num_classes=3)),
        classes=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    )
    other = config_to_dict(dataclasses.replace(debug, num_classes=4, num_queries=debug.num_queries + 1))
    with pytest.raises(IncompatibleRunError) as raised:
        check_same_run(saved, "pretrain", other, [{"id": 3, "name": "c"}], Path("out/checkpoints"))
    message = str(raised.value)
    assert "model.num_queries: checkpoint" in message and "model.num_classes: checkpoint" not in message
    assert "id 1: checkpoint 'a', data no class" in message and "data= and model=" in message
    # Another model on the same data: model= as before.
    same_data = config_to_dict(dataclasses.replace(debug, num_classes=3, num_queries=debug.num_queries + 1))
    with pytest.raises(
        IncompatibleRunError, match=r"another model \(model.num_queries.*the model= of that run"
    ):
        check_same_run(saved, "pretrain", same_data, saved.classes, Path("out/checkpoints"))


# ---- 3. an LR drop the run never reaches ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("drops", "epochs", "message"),
    [
        ([4], 4, r"drops at epochs \[4\].*train.epochs=4 \(epochs 0..3\).*train.lr_drop_epochs=\[\]"),
        ([2, 9], 5, r"drops at epochs \[9\].*train.lr_drop_epochs=\[2\]"),
        ([0], 5, r"train.lr_drop_epochs must be increasing epochs >= 1"),
        ([-1], 5, r"train.lr_drop_epochs must be increasing epochs >= 1"),
    ],
)
def test_lr_drop_epochs_must_fall_inside_the_run(drops: list[int], epochs: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(epochs=epochs, lr_drop_epochs=drops)
    assert (
        TrainConfig(epochs=epochs + max(drops) + 1, lr_drop_epochs=[e for e in drops if e >= 1]) is not None
    )


def test_shortened_experiment_with_its_drop_is_refused_at_composition() -> None:
    overrides = ["experiment=r50_coco_12ep", "data=/shards/train", "train.backbone_weights=/w.pth"]
    assert validate(compose("pretrain", overrides)).train.lr_drop_epochs == [11]
    with pytest.raises(ConfigError, match=r"train.lr_drop_epochs \[11\].*train.epochs=11"):
        validate(compose("pretrain", [*overrides, "train.epochs=11"]))
    validate(compose("pretrain", [*overrides, "train.epochs=11", "train.lr_drop_epochs=[]"]))


# ---- 4. a damaged checkpoint ----------------------------------------------------------------------------


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_checkpoint_is_refused_before_launch(demo_shards, tmp_path, launched, capsys) -> None:
    cfg = _config(demo_shards["pretrain/train"], tmp_path / "out")
    _checkpoint(cfg)
    longer = _config(demo_shards["pretrain/train"], tmp_path / "out", max_steps=STEPS + 2)
    damaged = CheckpointDir(cfg.out).root / step_tag(STEPS)
    _cut(damaged / "mp_rank_00_model_states.pt")
    assert stage.run(longer) == 2
    error = capsys.readouterr().err
    assert (
        f"the checkpoint {damaged} is damaged (mp_rank_00_model_states.pt: not a complete torch archive"
        in error
    )
    assert "only checkpoint" in error and "new out=" in error
    assert launched == []
    assert (damaged / "mp_rank_00_model_states.pt").is_file()  # nothing deleted


def test_check_files_names_each_damage_and_the_earlier_checkpoint(tmp_path) -> None:
    checkpoints = CheckpointDir(tmp_path / "out")
    states = {}
    for step in (2, 4):
        tag = step_tag(step)
        _stand_in_files(checkpoints, tag)
        states[tag] = _state(step)
        checkpoints.check_files(tag, states[tag])  # whole
    tag = step_tag(4)
    _cut(checkpoints.root / tag / "mp_rank_00_model_states.pt")
    (checkpoints.root / tag / "ranks" / "rank_00000.json").write_text('{"rng": ')
    with pytest.raises(CheckpointError) as raised:
        checkpoints.check_files(tag, states[tag])
    message = str(raised.value)
    assert str(checkpoints.root / tag) in message
    assert "mp_rank_00_model_states.pt: not a complete torch archive" in message
    assert "ranks/rank_00000.json: not readable JSON" in message
    assert (
        f"delete {checkpoints.root / tag} and write {step_tag(2)} into {checkpoints.root / 'latest'}"
        in message
    )
    # ZeRO >= 1: each rank's optimizer states must be there.
    with pytest.raises(CheckpointError, match=r"no ZeRO optimizer states of rank 1"):
        checkpoints.check_files(
            step_tag(2), dataclasses.replace(states[step_tag(2)], zero_stage=2, world_size=2)
        )


def test_a_load_failure_names_the_checkpoint(tmp_path) -> None:
    checkpoints = CheckpointDir(tmp_path)
    (checkpoints.root / step_tag(2)).mkdir(parents=True)

    def load(root: Path, tag: str) -> None:
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")

    trainer = types.SimpleNamespace(engine=types.SimpleNamespace(load=load), checkpoints=checkpoints)
    with pytest.raises(
        CheckpointError, match=r"cannot load the checkpoint .*step_00000002 \(RuntimeError: Pytorch"
    ):
        Trainer.restore(trainer, step_tag(2))  # type: ignore[arg-type]
