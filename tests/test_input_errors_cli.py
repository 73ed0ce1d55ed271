"""Bad input on the command line fails early, names the input and the fix, and loses nothing: a refused
command leaves an existing ``out`` byte for byte as it was (Hydra's record included), ``eval shards=`` is
checked against the manifest, ``shard`` names a wrong image root, a shard given as a manifest is named as
such, ``run`` (dry run too) names every missing dataset root or weight file before any stage, and an
override Hydra's grammar cannot read is named with the quoted form that works."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.config import compose, override_problem
from pipeline.data.coco_source import AnnotationFileError
from pipeline.data.config import DatasetConfig, ShardConfig, ShardStageConfig
from pipeline.data.manifest import Manifest, ManifestError, ShardEntry, load_manifest
from pipeline.data.shard import run_shard


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _finished_training_run(folder: Path) -> Path:
    """A finished pretrain folder as far as the CLI can tell: its record, card, result and log."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("stage: pretrain\nout: THE RUN THAT MADE THIS\n")
    (folder / ".hydra" / "overrides.yaml").write_text("- out=THE RUN THAT MADE THIS\n")
    (folder / ".hydra" / "hydra.yaml").write_text("hydra: {}\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "latest").write_text("step_00000002")
    (folder / "model.json").write_text(json.dumps({"stage": "pretrain"}))
    (folder / "train_result.json").write_text(json.dumps({"stage": "pretrain", "steps": 2}))
    (folder / "cli.log").write_text("[log of the run]\n")
    return folder


def test_eval_into_a_training_run_is_refused_and_leaves_it_byte_identical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _finished_training_run(tmp_path / "pre")
    before = _snapshot(run)
    code = cli_main(
        [
            "eval",
            f"checkpoint={run}",
            f"data={tmp_path / 'nowhere'}",
            f"out={run}",
            "tracking=none",
            "device=cpu",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert f"out={run} holds the output of pretrain" in error and f"out={run}_eval" in error
    assert _snapshot(run) == before


def test_a_command_refused_by_its_stage_leaves_the_record_of_the_last_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An earlier evaluation's folder: eval may write there, but this one is refused for its data (exit 2)
    # after Hydra has composed it: the folder (its .hydra record) must not change.
    folder = tmp_path / "eval"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text("checkpoint: THE EVALUATION THAT MADE THIS\n")
    (folder / "metrics.json").write_text("{}")
    (folder / "detections.json").write_text("[]")
    before = _snapshot(folder)
    code = cli_main(
        ["eval", f"checkpoint={tmp_path}", f"data={tmp_path / 'nowhere'}", f"out={folder}", "tracking=none"]
    )
    assert code == 2
    assert "no manifest here" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_pretrain_into_an_evaluation_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    (folder / "detections.json").write_text("[]")
    before = _snapshot(folder)
    assert cli_main(["pretrain", f"data={tmp_path}", f"out={folder}", "tracking=none"]) == 2
    assert "holds the output of eval" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_an_accepted_command_writes_the_hydra_record(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    sizes = ["pretrain_train=1", "pretrain_val=1", "finetune_train=1", "finetune_val=1"]
    assert cli_main(["make-demo-data", f"out={out}", *sizes, "min_size=64", "max_size=64"]) == 0
    assert f"out={out}" in yaml.safe_load((out / ".hydra" / "overrides.yaml").read_text())
    assert "\npretrain_train: 1\n" in (out / ".hydra" / "config.yaml").read_text()  # as Hydra writes it
    assert (out / ".hydra" / "hydra.yaml").is_file()


def _manifest(folder: Path, names: list[str]) -> Manifest:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x" * 10)
    shards = [ShardEntry(name, 1, 0, 10, "0" * 64) for name in names]
    return Manifest(
        1, "d", "val", "coco_format", len(names), 0, shards, [], [], [], {}, {}, str(folder / "manifest.json")
    )


def test_a_shard_template_is_checked_against_the_manifest(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "split", ["d-val-000000.tar", "d-val-000001.tar"])
    copy = tmp_path / "copy"
    _manifest(copy, ["d-val-000000.tar", "d-val-000001.tar"])
    manifest.check_local_shards(f"{copy}/{{name}}")  # every shard there: fine
    manifest.check_local_shards("pipe:curl -s http://host/{name}")  # left to the reader
    manifest.check_local_shards("https://host/shards/{name}")
    with pytest.raises(ManifestError, match=r"2 of the 2 shard\(s\) .* missing .*nowhere/d-val-000000.tar"):
        manifest.check_local_shards(f"{tmp_path}/nowhere/{{name}}")
    with pytest.raises(ManifestError, match=r"has no \{name\}, so every shard would be that one file"):
        manifest.check_local_shards(f"{copy}/d-val-000000.tar")
    with pytest.raises(ManifestError, match=r"is not a shard template .*\{name\}"):
        manifest.check_local_shards(f"{copy}/d-val-{{000000..000001}}.tar")


def test_eval_names_an_unquoted_shard_template(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["eval", "checkpoint=x", "data=y", "shards=/mnt/{name}"]) == 2
    assert "quote the template" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["/runs/a (copy)", "/runs/a~b", "/runs/it's (x)"])
def test_an_override_hydra_cannot_read_is_named_with_its_quoted_form(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert cli_main(["eval", "checkpoint=x", "data=y", f"out={out}{value}"]) == 2
    assert not out.parent.joinpath(f"eval{value}").exists()
    error = capsys.readouterr().err
    assert error.startswith(f"error: out={out}{value}: Hydra cannot read this override")
    # The fix it prints is one shell word that Hydra reads as exactly the path.
    (fix,) = shlex.split(re.search(r"quote it for Hydra: (.*)$", error.strip()).group(1))
    assert override_problem(fix) is None
    assert compose("eval", ["checkpoint=x", "data=y", fix]).out == Path(f"{out}{value}")
    assert override_problem("train.lr=1e-4,2e-4") is None and override_problem("x=[1,2]") is None


def test_a_shard_given_as_the_manifest_is_named(tmp_path: Path) -> None:
    tar = tmp_path / "split" / "d-val-000000.tar"
    tar.parent.mkdir()
    tar.write_bytes(b"\0" * 1024)
    with pytest.raises(ManifestError, match=r"is a shard \(a tar file\), not a manifest: give the split's"):
        load_manifest(tar)


def test_shard_names_an_image_root_that_holds_none_of_the_images(tmp_path: Path) -> None:
    annotations = tmp_path / "train.json"
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "width": 64, "height": 64} for i in range(1, 4)]
    category = [{"id": 1, "name": "thing", "supercategory": ""}]
    annotations.write_text(json.dumps({"images": images, "annotations": [], "categories": category}))
    wrong_root = tmp_path / "images"  # the images are elsewhere
    wrong_root.mkdir()
    cfg = ShardStageConfig(
        out=tmp_path / "shards",
        dataset=DatasetConfig(kind="coco_format", name="mine", images=wrong_root, annotations=annotations),
        shard=ShardConfig(images_per_shard=2),
    )
    with pytest.raises(
        AnnotationFileError, match=rf"0 of 3 listed images found under {wrong_root}.*dataset.images"
    ):
        run_shard(cfg)


def test_run_dry_run_names_missing_dataset_roots_and_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    coco, weights = tmp_path / "coco", tmp_path / "weights"
    argv = ["run", "experiment=r50_coco", f"paths.coco={coco}", f"paths.weights={weights}", "tracking=none"]
    argv += [f"out={tmp_path / 'run'}", "dry_run=true"]
    assert cli_main(argv) == 2
    error = capsys.readouterr().err
    assert (
        f"stage train: train.backbone_weights: {weights}/resnet50.pth: no such file; set paths.weights"
        in error
    )
    assert f"stage shard_coco_val: dataset.root: {coco}/val2017: no such folder; set paths.coco" in error
    for split in ("train", "val"):
        (coco / f"{split}2017").mkdir(parents=True, exist_ok=True)
        (coco / "annotations").mkdir(exist_ok=True)
        (coco / "annotations" / f"instances_{split}2017.json").write_text("{}")
    weights.mkdir()
    (weights / "resnet50.pth").write_bytes(b"")
    assert cli_main(argv) == 0
    assert "shard_coco_train: run" in capsys.readouterr().out
