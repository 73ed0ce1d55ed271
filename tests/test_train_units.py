"""The training stage's parts without processes: config checks and composition, parameter-group rules,
the LR schedule, the DeepSpeed config, the class remap, EMA, the loss meter, the non-finite guard,
checkpoint bookkeeping and RNG capture."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from dino_core.builder import build_criterion, build_dino
from dino_core.class_remap import match_classes, normalise_name, remap_class_rows
from dino_core.config import config_to_dict
from dino_core.presets import preset
from pipeline.config import compose, validate
from pipeline.launch import resolve_kind
from pipeline.train.checkpointing import (
    CheckpointDir,
    CheckpointError,
    IncompatibleRunError,
    TrainState,
    check_resumable,
    restore_rng,
    rng_state,
    step_tag,
)
from pipeline.train.config import DeepSpeedConfig, EMAConfig, LauncherConfig, TrainConfig, TrainStageConfig
from pipeline.train.ema import EMA
from pipeline.train.engine import (
    ZERO3_STEP_RESIDENT,
    PrecisionError,
    _zero3_resident,
    deepspeed_config,
    effective_zero_stage,
    resolve_precision,
)
from pipeline.train.optim import (
    describe_groups,
    group_rules,
    parameter_groups,
    step_schedule,
    total_steps,
)
from pipeline.train.stage import DataError, plan_data
from pipeline.train.step import (
    LossMeter,
    NonFiniteGuard,
    NonFiniteLossError,
    loss_term_names,
    stack_terms,
    training_targets,
)

DEBUG = dataclasses.replace(preset("debug"), num_classes=10)


# ---- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: TrainConfig(lr=0.0), "train.lr must be > 0"),
        (lambda: TrainConfig(epochs=0), "train.epochs must be >= 1"),
        (lambda: TrainConfig(lr_drop_epochs=[5, 3]), "train.lr_drop_epochs"),
        (lambda: TrainConfig(seed=-1), "train.seed must be >= 0"),
        (lambda: TrainConfig(class_aliases=["tv"]), "train.class_aliases"),
        (lambda: EMAConfig(decay=1.0), "train.ema.decay"),
        (lambda: DeepSpeedConfig(zero_stage=4), "deepspeed.zero_stage"),
        (lambda: DeepSpeedConfig(precision="fp8"), "deepspeed.precision"),
        (lambda: DeepSpeedConfig(precision="fp16", zero_stage=0), "needs deepspeed.zero_stage >= 1"),
        (lambda: DeepSpeedConfig(offload_params=True, zero_stage=2), "offload_params needs"),
        (lambda: LauncherConfig(kind="slurm"), "launcher.kind"),
        (lambda: TrainStageConfig(model=DEBUG), "data must be set"),
        (lambda: TrainStageConfig(model=DEBUG, data="m.json", stage="finetune"), "finetune needs init"),
        (lambda: TrainStageConfig(model=DEBUG, data="m.json", init=Path("x")), "init is for finetune"),
        (
            lambda: TrainStageConfig(
                model=DEBUG,
                data="m.json",
                stage="finetune",
                init=Path("x"),
                train=TrainConfig(backbone_weights=Path("w.pth")),
            ),
            "backbone_weights is for pretraining",
        ),
    ],
)
def test_config_errors_name_the_key(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "overrides",
    [
        ["deepspeed=zero0", "launcher=single"],
        ["deepspeed=zero1", "launcher=torchrun", "tracking=none"],
        ["deepspeed=zero3", "launcher=ray", "train=debug"],
        ["deepspeed=zero3_offload", "launcher=ray_gpu", "tta=multiscale_flip"],
    ],
)
@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_commands_compose_and_validate(command: str, overrides: list[str]) -> None:
    extra = ["init=/nonexistent/pretrain"] if command == "finetune" else []
    cfg = validate(compose(command, ["model=debug", "data=/x/manifest.json", *extra, *overrides]))
    assert isinstance(cfg, TrainStageConfig)
    assert cfg.stage == command
    assert cfg.model.backbone.name == "resnet18"
    if "train=debug" not in overrides:
        # The recipes of DESIGN.md: 26 / 18 epochs, 1.0x / 1.5x sizes, paper learning rates.
        assert cfg.train.epochs == (26 if command == "pretrain" else 18)
        assert cfg.train.aug_scale == (1.0 if command == "pretrain" else 1.5)
        assert (cfg.train.lr, cfg.train.lr_backbone, cfg.train.clip_max_norm) == (1e-4, 1e-5, 0.1)
    zero = {"zero0": 0, "zero1": 1, "zero3": 3, "zero3_offload": 3}[overrides[0].split("=")[1]]
    assert cfg.deepspeed.zero_stage == zero


def test_default_preset_and_zero_stage() -> None:
    cfg = validate(compose("pretrain", ["data=/x/manifest.json"]))
    assert cfg.model == preset("dino_swinl_4scale")
    assert cfg.deepspeed.zero_stage == 2
    assert cfg.deepspeed.precision == "auto"
    assert cfg.launcher.kind == "auto"


def test_resolve_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_kind("auto") == "single"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_kind("auto") == "torchrun"
    assert resolve_kind("ray") == "ray"


# ---- parameter groups and schedule -------------------------------------------------------------------


def test_parameter_group_rules() -> None:
    train = TrainConfig(lr=1e-4, lr_backbone=1e-5, lr_linear_proj_mult=0.1, weight_decay=1e-4)
    model = build_dino(DEBUG)
    groups, frozen = parameter_groups(model, group_rules(train), train.weight_decay)
    by_name = {g.name: g for g in groups}
    assert list(by_name) == ["backbone", "linear_proj", "default"]
    assert all(n.startswith("backbone.") for n in by_name["backbone"].names)
    assert sorted(by_name["linear_proj"].names) == sorted(
        n for n, p in model.named_parameters() if ".sampling_offsets." in n
    )
    assert any(
        n.startswith("encoder.layers.0.self_attn.sampling_offsets") for n in by_name["linear_proj"].names
    )
    assert any(
        n.startswith("decoder.layers.1.cross_attn.sampling_offsets") for n in by_name["linear_proj"].names
    )
    assert "class_head.weight" in by_name["default"].names
    assert "decoder.layers.0.cross_attn.value_proj.weight" in by_name["default"].names
    assert math.isclose(by_name["backbone"].lr, 1e-5)
    assert math.isclose(by_name["linear_proj"].lr, 1e-5)
    assert math.isclose(by_name["default"].lr, 1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assigned = [n for g in groups for n in g.names]
    assert sorted(assigned) == sorted(trainable)  # every trainable parameter exactly once
    assert frozen == sum(p.numel() for p in model.parameters() if not p.requires_grad) > 0
    lines = describe_groups(groups, frozen)
    for group, line in zip(groups, lines):
        assert group.name in line and f"{group.numel:,} parameters" in line
    assert f"{frozen:,}" in lines[-1]


def test_no_decay_split() -> None:
    train = TrainConfig(decay_norm_and_bias=False)
    model = build_dino(DEBUG)
    groups, _ = parameter_groups(model, group_rules(train), 1e-4, decay_norm_and_bias=False)
    by_name = {g.name: g for g in groups}
    assert by_name["default/no_decay"].weight_decay == 0.0
    assert "class_head.bias" in by_name["default/no_decay"].names
    assert "class_head.weight" in by_name["default"].names
    assert all(p.dim() >= 2 for p in by_name["default"].params)
    assert by_name["linear_proj/no_decay"].lr == by_name["linear_proj"].lr


def test_step_schedule() -> None:
    train = TrainConfig(lr_drop_epochs=[2, 3], lr_drop_factor=0.1, warmup_steps=4, grad_accumulation=2)
    schedule = step_schedule(train, micro_batches_per_epoch=10)  # 5 optimizer steps per epoch
    assert schedule.drop_steps == (10, 15)
    assert [schedule.factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.factor(9) == 1.0
    assert math.isclose(schedule.factor(10), 0.1)
    assert math.isclose(schedule.factor(15), 0.01)
    # An odd epoch length: the drop applies from the step that consumes the epoch's first batch (epoch 3
    # starts at micro-batch 21, which step 10 consumes with micro-batch 20).
    assert step_schedule(train, 7).drop_steps == (7, 10)
    assert total_steps(TrainConfig(epochs=3, grad_accumulation=2), 10) == 15
    assert total_steps(TrainConfig(epochs=3, max_steps=4), 10) == 4


# ---- DeepSpeed config ---------------------------------------------------------------------------------


def test_deepspeed_config() -> None:
    train = TrainConfig(batch_size=2, grad_accumulation=4, clip_max_norm=0.1)
    fp32 = deepspeed_config(DeepSpeedConfig(zero_stage=2), train, "fp32")
    assert fp32["train_micro_batch_size_per_gpu"] == 2 and fp32["gradient_accumulation_steps"] == 4
    assert fp32["gradient_clipping"] == 0.1 and fp32["zero_optimization"]["stage"] == 2
    assert "bf16" not in fp32 and "fp16" not in fp32 and "torch_autocast" not in fp32
    assert "optimizer" not in fp32  # a client torch AdamW: no FusedAdam build
    bf16 = deepspeed_config(DeepSpeedConfig(), train, "bf16")
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    fp16 = deepspeed_config(DeepSpeedConfig(zero_stage=1, fp16_initial_scale_power=12), train, "fp16")
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert fp16["fp16"]["initial_scale_power"] == 12
    offload = deepspeed_config(
        DeepSpeedConfig(zero_stage=3, offload_optimizer=True, offload_params=True), train, "fp32"
    )
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="resolved"):
        deepspeed_config(DeepSpeedConfig(), train, "auto")


@pytest.mark.parametrize(
    ("ds", "world_size", "precision", "expected"),
    [
        (DeepSpeedConfig(zero_stage=2), 1, "bf16", 0),
        (DeepSpeedConfig(zero_stage=1), 1, "fp32", 0),
        (DeepSpeedConfig(zero_stage=0), 1, "fp32", 0),
        (DeepSpeedConfig(zero_stage=2), 2, "bf16", 2),
        (DeepSpeedConfig(zero_stage=3), 1, "bf16", 3),
        (DeepSpeedConfig(zero_stage=2, offload_optimizer=True), 1, "bf16", 2),
        (DeepSpeedConfig(zero_stage=2, precision="fp16"), 1, "fp16", 2),
    ],
)
def test_effective_zero_stage(ds: DeepSpeedConfig, world_size: int, precision: str, expected: int) -> None:
    # One rank has nothing to partition, except what stage 3 and offloading move off the device.
    assert effective_zero_stage(ds, world_size, precision) == expected


def test_resolve_precision_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(PrecisionError, match="needs a GPU"):
        resolve_precision("fp16", cpu)


def test_zero3_resident_parameters_exist() -> None:
    # Every pattern must still name parameters of the detector (a rename in dino_core would silently
    # drop one and break ZeRO-3).
    names = [
        n for n, _ in build_dino(dataclasses.replace(DEBUG, query_selection="static")).named_parameters()
    ]
    names += [n for n, _ in build_dino(DEBUG).named_parameters()]
    for pattern in ZERO3_STEP_RESIDENT:
        assert any(_zero3_resident(n) and (pattern in n or n.startswith(pattern)) for n in names), pattern
    assert not _zero3_resident("decoder.layers.0.cross_attn.value_proj.weight")


# ---- loss terms, meter, guard --------------------------------------------------------------------------


def test_loss_term_names_match_the_criterion() -> None:
    torch.manual_seed(0)
    model, criterion = build_dino(DEBUG), build_criterion(DEBUG)
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])}
    ]
    terms = criterion(model(torch.randn(1, 3, 96, 96), torch.tensor([[96, 96]]), targets), targets)
    names = loss_term_names(DEBUG)
    assert sorted(terms) == sorted(names)
    vector = stack_terms(terms, names)
    assert vector[0] == terms["loss"] and vector.dtype == torch.float32
    del terms["loss_class_dn"]
    assert stack_terms({**terms, "loss": vector[0]}, names)[names.index("loss_class_dn")] == 0
    with pytest.raises(KeyError, match="loss_new"):
        stack_terms({**terms, "loss_new": vector[0]}, names)


def test_training_targets_drop_crowd() -> None:
    from pipeline.data.collate import Batch

    batch = Batch(
        torch.zeros(2, 3, 8, 8),
        torch.tensor([[8, 8], [8, 8]]),
        [
            {
                "boxes": torch.rand(3, 4),
                "labels": torch.tensor([1, 2, 3]),
                "iscrowd": torch.tensor([False, True, False]),
            },
            {
                "boxes": torch.zeros(0, 4),
                "labels": torch.zeros(0, dtype=torch.int64),
                "iscrowd": torch.zeros(0, dtype=torch.bool),
            },
        ],
        torch.tensor([1, 2]),
        torch.tensor([[8, 8], [8, 8]]),
    )
    targets, count = training_targets(batch)
    assert count == 2
    assert targets[0]["labels"].tolist() == [1, 3] and "iscrowd" not in targets[0]
    assert targets[1]["boxes"].shape == (0, 4)


def test_loss_meter_means_and_state() -> None:
    meter = LossMeter(["loss", "loss_class"])
    meter.add(torch.tensor([2.0, 1.0]))
    meter.add(torch.tensor([4.0, 3.0]))
    saved = json.loads(json.dumps(meter.state()))
    assert meter.read() == {"loss": 3.0, "loss_class": 2.0}
    assert meter.read() == {}
    other = LossMeter(["loss", "loss_class"])
    other.restore(saved, torch.device("cpu"))
    assert other.read() == {"loss": 3.0, "loss_class": 2.0}
    with pytest.raises(ValueError, match="loss terms"):
        LossMeter(["loss"]).restore(saved, torch.device("cpu"))


def test_non_finite_guard() -> None:
    guard = NonFiniteGuard(patience=3)
    guard.record(False, 10, {"loss": float("nan")}, "ckpt/step_00000008")
    guard.record(True, 10, None, "ckpt/step_00000008")
    guard.record(False, 11, {"loss": float("inf")}, "ckpt/step_00000008")
    guard.record(False, 11, {"loss": float("nan")}, "ckpt/step_00000008")
    assert (guard.skipped, guard.in_row) == (3, 2)
    with pytest.raises(NonFiniteLossError) as caught:
        guard.record(
            False,
            11,
            {"loss": float("nan"), "loss_bbox": 0.5, "loss_class": float("inf")},
            "ckpt/step_00000008",
        )
    message = str(caught.value)
    assert "step 11" in message and "ckpt/step_00000008" in message
    assert "non-finite terms loss=nan, loss_class=inf; finite terms loss_bbox=0.5;" in message
    assert guard.skipped == 4


# ---- EMA ---------------------------------------------------------------------------------------------


def test_ema_update_state_and_load() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    model[1].weight.requires_grad_(False)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.shadow.items()}
    assert sorted(start) == ["0.bias", "0.weight", "1.bias"]
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    expected = 0.9 * start["0.weight"] + 0.1 * model[0].weight
    torch.testing.assert_close(ema.shadow["0.weight"], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(ema.shadow["0.bias"], start["0.bias"])
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    averaged = ema.state_dict(full)
    assert list(averaged) == list(full)  # buffers and frozen weights included, in model order
    torch.testing.assert_close(averaged["1.weight"], full["1.weight"])
    torch.testing.assert_close(averaged["1.running_mean"], full["1.running_mean"])
    other = EMA(model, decay=0.9)
    other.load(averaged)
    torch.testing.assert_close(other.shadow["0.weight"], expected, rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="lack"):
        other.load({"0.weight": expected})


# ---- class remap ---------------------------------------------------------------------------------------


def test_match_classes_by_normalised_name_and_alias() -> None:
    source = {1: "Person", 2: "Sneakers", 3: "Dining  Table", 4: "Monitor/TV"}
    target = {1: "person", 7: "dining table", 9: "tv", 12: "zebra"}
    assert normalise_name(" Dining  Table ") == "dining table"
    assert match_classes(source, target) == {1: 1, 7: 3}
    assert match_classes(source, target, {"tv": "Monitor/TV"}) == {1: 1, 7: 3, 9: 4}
    with pytest.raises(ValueError, match="two classes"):
        match_classes({1: "cat", 2: "Cat"}, target)
    with pytest.raises(ValueError, match="source classes that do not exist"):
        match_classes(source, target, {"tv": "Television"})
    with pytest.raises(ValueError, match=r"target classes that do not exist: \['unicorn'\]"):
        match_classes(source, target, {"Unicorn": "Person"})


def test_remap_class_rows() -> None:
    torch.manual_seed(0)
    source_cfg = dataclasses.replace(DEBUG, num_classes=10)
    target_cfg = dataclasses.replace(DEBUG, num_classes=6)
    source = build_dino(source_cfg).state_dict()
    init = build_dino(target_cfg).state_dict()
    source_classes = {1: "red circle", 3: "blue square", 5: "red triangle", 9: "blue diamond"}
    target_classes = {1: "purple star", 2: "blue square", 3: "red circle", 5: "red triangle"}
    state, report = remap_class_rows(source, init, source_classes, target_classes)
    assert sorted(report.class_keys) == sorted(
        [
            "class_head.weight",
            "class_head.bias",
            "query_selection.enc_class_head.weight",
            "query_selection.enc_class_head.bias",
            "label_enc.weight",
        ]
    )
    assert report.remapped == [("blue square", 3, 2), ("red circle", 1, 3), ("red triangle", 5, 5)]
    assert report.reinitialised == [("purple star", 1)]
    assert len(report.loaded) == len(init) - 5
    for key in report.class_keys:
        assert state[key].shape == init[key].shape
        for _, s, t in report.remapped:
            torch.testing.assert_close(state[key][t], source[key][s])
        torch.testing.assert_close(state[key][1], init[key][1])  # purple star: fresh row
        torch.testing.assert_close(state[key][0], init[key][0])  # no class 0: fresh row
    torch.testing.assert_close(state["label_enc.weight"][6], source["label_enc.weight"][10])
    torch.testing.assert_close(state["level_embed"], source["level_embed"])
    assert "purple star" in report.summary() and "3 classes matched" in report.summary()
    other = build_dino(dataclasses.replace(target_cfg, d_model=64, n_heads=2)).state_dict()
    with pytest.raises(ValueError, match="another architecture"):
        remap_class_rows(source, other, source_classes, target_classes)
    with pytest.raises(ValueError, match="outside"):
        remap_class_rows(source, init, source_classes, {**target_classes, 6: "blue diamond"})


# ---- checkpoints ---------------------------------------------------------------------------------------


def _state(**changes) -> TrainState:
    base = TrainState(
        stage="pretrain",
        global_step=4,
        epoch=0,
        batch_in_epoch=4,
        micro_batches=4,
        skipped_nonfinite=0,
        world_size=2,
        batch_size=1,
        num_workers=0,
        grad_accumulation=1,
        seed=42,
        batches_per_epoch=16,
        model=config_to_dict(DEBUG),
        classes=[{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    )
    return dataclasses.replace(base, **changes)


def test_checkpoint_dir_commit_latest_prune(tmp_path: Path) -> None:
    ckpt = CheckpointDir(tmp_path)
    assert ckpt.latest() is None
    for step in (2, 4, 6):
        partial = ckpt.root / ckpt.partial(step)
        partial.mkdir(parents=True)
        ckpt.write_state(ckpt.partial(step), _state(global_step=step))
        ckpt.write_rank_state(ckpt.partial(step), 1, {"x": step})
        assert ckpt.latest() in (None, step_tag(step - 2))  # not switched before the commit
        assert ckpt.commit(step) == step_tag(step)
        assert ckpt.latest() == step_tag(step)
    assert ckpt.read_state(step_tag(6)).global_step == 6
    assert ckpt.read_rank_state(step_tag(4), 1) == {"x": 4}
    with pytest.raises(CheckpointError, match="fewer ranks"):
        ckpt.read_rank_state(step_tag(4), 3)
    assert ckpt.prune(2, {step_tag(6)}) == [step_tag(2)]
    assert ckpt.step_dirs() == [step_tag(4), step_tag(6)]
    (ckpt.root / ckpt.partial(8)).mkdir()
    assert ckpt.remove_partials() == [ckpt.partial(8)]
    # latest naming a directory without its train state is refused.
    (ckpt.root / "latest").write_text(step_tag(8))
    (ckpt.root / step_tag(8)).mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        ckpt.latest()


def test_check_resumable() -> None:
    saved = _state()
    check_resumable(saved, _state(global_step=0, epoch=0, batch_in_epoch=0), Path("out/checkpoints"))
    # A checkpoint written before a config field existed compares as that field's default.
    older = config_to_dict(DEBUG)
    del older["pe_temperature"]
    check_resumable(_state(model=older), saved, Path("out/checkpoints"))
    with pytest.raises(IncompatibleRunError, match="cannot describe"):
        check_resumable(_state(model={**config_to_dict(DEBUG), "removed_field": 1}), saved, Path("x"))
    for changed, message in [
        (_state(model=config_to_dict(dataclasses.replace(DEBUG, d_model=64, n_heads=2))), "another model"),
        (_state(classes=[{"id": 1, "name": "a"}, {"id": 2, "name": "c"}]), "another class table"),
        (_state(stage="finetune"), "pretrain run"),
        (_state(world_size=4), "world_size 2 -> 4"),
        (_state(num_workers=2), "num_workers 0 -> 2"),
    ]:
        with pytest.raises(IncompatibleRunError, match=message):
            check_resumable(saved, changed, Path("out/checkpoints"))
    # The ZeRO stage fixes the checkpoint files' layout; states written before it was recorded pass.
    with pytest.raises(IncompatibleRunError, match="ZeRO stage 2 -> 0"):
        check_resumable(_state(zero_stage=2), _state(zero_stage=0), Path("out/checkpoints"))
    check_resumable(_state(zero_stage=None), _state(zero_stage=0), Path("out/checkpoints"))
    check_resumable(_state(zero_stage=3), _state(zero_stage=3), Path("out/checkpoints"))


def test_train_state_json_round_trip(tmp_path: Path) -> None:
    state = _state(metrics={"plain/AP": 0.5})
    assert TrainState.from_json(state.to_json(), tmp_path) == state
    with pytest.raises(CheckpointError, match="not a"):
        TrainState.from_json(b'{"format": "other"}', tmp_path)


def test_rng_state_round_trip_through_json() -> None:
    device = torch.device("cpu")
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    saved = json.loads(json.dumps(rng_state(device)))
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    restore_rng(saved, device)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_val_data_of_another_label_space_is_refused_before_training(
    coco_sample_shards: Path, tmp_path: Path
) -> None:
    """Same ids, another name: the validation split is another label space (its AP would be meaningless)."""
    manifest = json.loads(coco_sample_shards.read_text())
    manifest["categories"][0]["name"] = "not " + manifest["categories"][0]["name"]
    other = coco_sample_shards.parent / "manifest_renamed.json"
    other.write_text(json.dumps(manifest))
    try:
        cfg = TrainStageConfig(model=preset("debug"), data=str(coco_sample_shards), val_data=str(other))
        assert plan_data(dataclasses.replace(cfg, val_data=str(coco_sample_shards))).val is not None
        with pytest.raises(
            DataError, match=r"val_data .* has categories the training split does not \(id: name 1"
        ):
            plan_data(cfg)
    finally:
        other.unlink()
