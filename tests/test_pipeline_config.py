"""Every named experiment composes, validates and builds its model(s) on the meta device; a wrong key,
type or value fails naming it (for ``run`` and for the stages it composes)."""

from __future__ import annotations

import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from pipeline_helpers import meta_parameter_count

from dino_core import PRESETS, build_criterion, build_dino
from pipeline.config import CONF_DIR, ConfigError, compose, hydra_value, validate
from pipeline.orchestrate import PipelineError, plan

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PATHS = ["paths.coco=/data/coco", "paths.o365=/data/o365", "paths.weights=/data/weights"]
STAGE_INPUTS = {
    "pretrain": ["data=/shards/train", "val_data=/shards/val"],
    "finetune": ["data=/shards/train", "val_data=/shards/val", "init=/runs/pretrain"],
}


def experiment_command(name: str) -> str:
    """The command an experiment is for: its ``# command: <name>`` header line."""
    found = re.search(r"^# command: ([\w-]+)$", (CONF_DIR / "experiment" / f"{name}.yaml").read_text(), re.M)
    assert found, f"conf/experiment/{name}.yaml lacks its '# command: <command>' header line"
    return found.group(1)


def stage_overrides(command: str, experiment: str) -> list[str]:
    """An experiment's overrides plus the inputs a stage needs (required values the recipe leaves open)."""
    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    parents = re.findall(r"^  - (\w+)$", text, re.M)
    required = any(
        "backbone_weights: ???" in (CONF_DIR / "experiment" / f"{n}.yaml").read_text()
        for n in [experiment, *parents]
    )
    weights = ["train.backbone_weights=/weights/backbone.pth"] if required else []
    return [f"experiment={experiment}", *STAGE_INPUTS.get(command, []), *weights]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_validates_and_builds_its_models_on_meta(experiment: str, tmp_path) -> None:
    command = experiment_command(experiment)
    if command == "run":
        cfg = validate(compose("run", [f"experiment={experiment}", f"out={tmp_path}", *PATHS]))
        stages = plan(cfg)  # composes and validates every stage as its own command
        assert [s.name for s in stages] == list(cfg.stages)
        models = [s.config.model for s in stages if getattr(s.config, "model", None) is not None]
        assert models, f"pipeline {experiment} trains no model"
    else:
        config = validate(compose(command, stage_overrides(command, experiment)))
        models = [config.model]
    for model in models:
        assert meta_parameter_count(model) > 0


@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if e.startswith(("table4_", "table7_"))])
def test_ablation_experiments_select_their_preset_on_the_table1_schedule(experiment: str) -> None:
    config = validate(compose("pretrain", stage_overrides("pretrain", experiment)))
    reference = validate(compose("pretrain", stage_overrides("pretrain", "r50_coco_12ep")))
    preset = PRESETS[experiment]
    assert config.model == PRESETS["dino_r50_4scale"].__class__(**{**preset.__dict__, "num_classes": 91})
    assert config.train == reference.train and config.deepspeed == reference.deepspeed


def test_the_paper_recipes_follow_table8_and_design_md() -> None:
    o365 = validate(compose("pretrain", stage_overrides("pretrain", "swinl_o365_pretrain")))
    coco = validate(compose("finetune", stage_overrides("finetune", "swinl_coco_finetune")))
    for cfg in (o365, coco):
        assert cfg.model.backbone.name == "swin_large_patch4_window12_384"
        assert cfg.model.denoising.num_queries == 1000 and cfg.model.num_queries == 900
        assert (cfg.train.lr, cfg.train.lr_backbone, cfg.train.weight_decay) == (1e-4, 1e-5, 1e-4)
        assert cfg.train.clip_max_norm == 0.1 and cfg.train.batch_size == 1
        assert cfg.train.activation_checkpointing.backbone
    assert (o365.train.epochs, o365.train.aug_scale) == (26, 1.0)
    assert (coco.train.epochs, coco.train.aug_scale) == (18, 1.5)
    r50 = validate(compose("pretrain", stage_overrides("pretrain", "r50_coco_12ep")))
    assert r50.model == PRESETS["dino_r50_4scale"].__class__(**{**PRESETS["dino_r50_4scale"].__dict__})
    assert (r50.train.epochs, r50.train.lr_drop_epochs) == (12, [11])


def test_the_demo_is_the_default_pipeline(tmp_path: Path) -> None:
    cfg = validate(compose("run", [f"out={tmp_path}"]))
    assert cfg.name == "demo" and cfg.tracking.experiment == "demo" and cfg.ray.address is None
    stages = plan(cfg)
    assert [s.command for s in stages] == ["make-demo-data", *["shard"] * 4, "pretrain", "finetune", "eval"]
    by_name = {s.name: s for s in stages}
    # Each stage reads only what earlier stages wrote under the pipeline's directory.
    assert by_name["finetune"].config.init == tmp_path / "pretrain"
    assert by_name["eval"].config.checkpoint == tmp_path / "finetune"
    assert by_name["eval"].config.tta.enabled
    assert by_name["pretrain"].config.launcher.kind == "ray"
    assert by_name["pretrain"].config.tracking.uri == f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.parametrize(
    "text",
    [
        "/runs/a",
        "/runs/run (copy)",
        "/a,b/c",
        "/it's/x",
        "/a\\b",
        "/a\\",
        "/a\\'b",
        "/a=b:c[1]{2}",
        " x ",
        "/ä ö",
        "/ä",
        "/a~b",
        "10",
        "true",
        "null",
        "",
        "http://host:5000/a",
    ],
)
def test_hydra_value_parses_back_to_the_text(text: str) -> None:
    assert OverridesParser.create().parse_override(f"out={hydra_value(text)}").value() == text
    # A plain path or URL stays as it is.
    assert (hydra_value(text) == text) == (text in ("/runs/a", "http://host:5000/a"))


def test_hydra_value_parses_back_random_text() -> None:
    rng = random.Random(0)
    alphabet = "ab/ .,()[]{}:=\\'\"~%@+-_\u00e4\t$!#*?|&;<>"
    parser = OverridesParser.create()
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        if "${" not in text:  # an interpolation, quoted or not
            assert parser.parse_override(f"out={hydra_value(text)}").value() == text, text


def test_the_pipeline_runs_in_a_folder_whose_name_is_hydra_syntax(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run (copy), it's"
    stages = plan(validate(compose("run", [f"out={hydra_value(str(out))}"])))
    by_name = {s.name: s for s in stages}
    assert by_name["shard_pretrain_train"].config.dataset.images == out / "demo_data" / "pretrain" / "train"
    assert by_name["finetune"].config.init == out / "pretrain" and by_name["eval"].config.out == out / "eval"
    assert by_name["eval"].config.tracking.uri == f"sqlite:///{out}/mlflow.db"
    # The recorded command line is one shell command that gives the stage the same overrides.
    for stage in stages:
        assert shlex.split(stage.command_line())[4:] == stage.overrides
    # A plain folder leaves every override as the experiment wrote it, a short relative one too.
    monkeypatch.chdir(tmp_path)
    plain = {s.name: s.overrides for s in plan(validate(compose("run", ["out=d"])))}
    assert plain["eval"][:4] == [
        "checkpoint=d/finetune",
        "data=d/shards/demo_finetune/val/manifest.json",
        "tta=multiscale_flip",
        "eval.short_side=160",
    ]
    assert plain["shard_pretrain_train"][:3] == [
        "dataset=demo_pretrain",
        "dataset.split=train",
        "dataset.images=d/demo_data/pretrain/train",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ray.num_cpus=two"], r"ray\.num_cpus"),
        (["ray.dashboard_port=0"], r"ray\.dashboard_port must be a TCP port"),
        (["tracking.kind=wandb"], r"tracking\.kind must be one of"),
        (["only=[pretrian]"], r"only names unknown stages \['pretrian'\]"),
        (["stages.eval.after=[finetune,nope]"], r"stages\.eval\.after names 'nope', which is not a stage"),
        (["stages.demo_data.after=[eval]"], r"stages\.demo_data\.after names 'eval', which comes later"),
        (["experiment=r50_coco"], r"paths\.coco \(the COCO 2017 root\) is not set .* DINO_COCO_ROOT"),
    ],
)
def test_a_wrong_run_setting_fails_naming_it(overrides: list[str], message: str, monkeypatch) -> None:
    for variable in ("DINO_COCO_ROOT", "DINO_O365_ROOT", "DINO_WEIGHTS_DIR"):
        monkeypatch.delenv(variable, raising=False)
    # Hydra refuses a wrong type while merging the override, the schemas refuse wrong values.
    with pytest.raises((ConfigError, ConfigCompositionException), match=message):
        validate(compose("run", overrides))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('stages.pretrain.extra=["train.lr=-1"]', r"stage pretrain .*train\.lr must be > 0"),
        ('stages.eval.extra=["eval.batchsize=2"]', r"stage eval .*batchsize"),
        ('stages.finetune.extra=["train.epochs=many"]', r"stage finetune .*train\.epochs"),
        ('stages.eval.extra=["tta=sideways"]', r"stage eval .*sideways"),
    ],
)
def test_a_wrong_stage_setting_fails_before_any_work_naming_stage_and_key(
    extra: str, message, tmp_path
) -> None:
    cfg = validate(compose("run", [f"out={tmp_path / 'run'}", extra]))
    with pytest.raises(PipelineError, match=message):
        plan(cfg)
    assert not (tmp_path / "run").exists()


def test_the_cli_refuses_an_unknown_key_and_dry_run_plans_without_work(tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", f"out={tmp_path}", "stagez.eval.enabled=false"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "stagez" in bad.stderr
    dry = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", f"out={tmp_path / 'demo'}", "dry_run=true"],
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert (
        "pretrain: run" in dry.stdout and "python -m pipeline finetune experiment=demo_finetune" in dry.stdout
    )
    assert not (tmp_path / "demo" / "summary.json").exists()
    # A selected stage whose input stage is neither selected nor complete is blocked, as the run would say.
    dry = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", f"out={tmp_path / 'demo'}", "dry_run=true", "only=[eval]"],
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0, dry.stderr
    assert "eval: blocked (needs finetune, shard_finetune_val)" in dry.stdout


def test_the_demo_model_normalises_its_from_scratch_backbone_and_every_parameter_learns() -> None:
    model_cfg = PRESETS["demo"]
    assert model_cfg.backbone.norm == "group_norm" and model_cfg.backbone.frozen_stages == -1
    torch.manual_seed(0)
    model = build_dino(model_cfg).train()
    norms = [type(m).__name__ for m in model.backbone.modules() if "Norm" in type(m).__name__]
    assert norms and set(norms) == {"_GroupNorm"}
    images = torch.randn(2, 3, 64, 80)
    sizes = torch.tensor([[64, 80], [56, 72]])
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
        {"labels": torch.tensor([5]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
    ]
    loss = build_criterion(model_cfg)(model(images, sizes, targets), targets)["loss"]
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(p.requires_grad for p in model.backbone.parameters())
