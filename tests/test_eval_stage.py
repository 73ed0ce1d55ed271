"""The evaluation stage end to end on CPU: the COCO sample as shards, the debug model, the files and their
schema, the same metrics for batch 1 and batch 4, every image exactly once over ranks and workers."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient

from dino_core.builder import build_dino
from dino_core.config import config_to_dict
from dino_core.presets import preset
from pipeline.checkpoint import ModelCard, save_model
from pipeline.cli import main as cli_main
from pipeline.data.manifest import (
    SCHEMA_VERSION,
    AnnotationFile,
    Category,
    Manifest,
    ShardEntry,
    load_manifest,
    write_manifest,
)
from pipeline.evaluation.coco_scoring import STAT_NAMES
from pipeline.evaluation.config import EvalConfig, TTAConfig
from pipeline.evaluation.samples import eval_samples, images_of_rank
from pipeline.evaluation.stage import (
    CheckpointMismatchError,
    EvalStageConfig,
    atd_function,
    check_checkpoint,
    manifest_sha256,
    run,
    run_evaluation,
)

SAMPLE = Path(__file__).parent / "data" / "coco_sample"
# Small sizes keep the debug model at ~0.1 s per image on two cores.
EVAL = {
    "short_side": 160,
    "max_size": 256,
    "num_workers": 0,
    "draw_images": 3,
    "draw_score_threshold": 0.0,
    "atd_k": 50,
}
TTA = {"enabled": True, "scales": [128, 160], "max_size": 256, "flip": True, "main_scale": 160}


def write_split(out: Path, images_per_shard: int = 5) -> Path:
    """Shard the COCO sample by data contract 1 (WebDataset tar: ``<key>.jpg`` + ``<key>.json``) and write
    its manifest (contract 2) with the data stage's dataclasses."""
    with open(SAMPLE / "instances.json") as f:
        coco = json.load(f)
    anns: dict[int, list[dict[str, Any]]] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(
            {k: a[k] for k in ("id", "category_id", "bbox", "area", "iscrowd")}
        )
    images = sorted(coco["images"], key=lambda im: im["id"])
    out.mkdir(parents=True)
    shards = []
    for index in range(0, len(images), images_per_shard):
        name = f"sample-val-{index // images_per_shard:06d}.tar"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for im in images[index : index + images_per_shard]:
                record = {k: im[k] for k in ("id", "file_name", "width", "height")} | {
                    "annotations": anns.get(im["id"], [])
                }
                for member, data in (
                    (f"{im['id']:012d}.jpg", (SAMPLE / "images" / im["file_name"]).read_bytes()),
                    (f"{im['id']:012d}.json", json.dumps(record).encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (out / name).write_bytes(buffer.getvalue())
        chunk = images[index : index + images_per_shard]
        shards.append(
            ShardEntry(
                name,
                len(chunk),
                sum(len(anns.get(im["id"], [])) for im in chunk),
                len(buffer.getvalue()),
                hashlib.sha256(buffer.getvalue()).hexdigest(),
            )
        )
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        dataset="sample",
        split="val",
        kind="coco_format",
        num_samples=len(images),
        num_annotations=len(coco["annotations"]),
        shards=shards,
        categories=[Category(c["id"], c["name"], c.get("supercategory", "")) for c in coco["categories"]],
        annotation_files=[
            AnnotationFile(
                "instances.json", hashlib.sha256((SAMPLE / "instances.json").read_bytes()).hexdigest()
            )
        ],
        rejects=[],
        reject_counts={},
    )
    write_manifest(manifest, out / "manifest.json")
    return out / "manifest.json"


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_split(tmp_path_factory.mktemp("shards") / "sample" / "val")


@pytest.fixture(scope="module")
def debug_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_dino(preset("debug")).eval()


def categories_of(manifest_path: Path) -> list[dict[str, Any]]:
    return [{"id": c.id, "name": c.name} for c in load_manifest(manifest_path).categories]


@pytest.mark.parametrize(("world_size", "workers"), [(1, 0), (1, 2), (2, 2), (3, 1)])
def test_every_image_exactly_once_over_ranks_and_workers(split: Path, world_size: int, workers: int) -> None:
    manifest = load_manifest(split)
    per_rank = [
        [s.image_id for s in eval_samples(manifest, r, world_size, workers)] for r in range(world_size)
    ]
    expected = [images_of_rank(manifest, r, world_size, workers) for r in range(world_size)]
    assert [len(ids) for ids in per_rank] == expected
    all_ids = sorted(im["id"] for im in json.loads((SAMPLE / "instances.json").read_text())["images"])
    assert sorted(i for ids in per_rank for i in ids) == all_ids and len(all_ids) == 12
    sample = next(iter(eval_samples(manifest, 0, 1, 0)))
    assert sample.image.dtype == torch.uint8 and tuple(sample.image.shape[1:]) == (
        sample.record["height"],
        sample.record["width"],
    )
    assert all({"bbox", "area", "iscrowd", "category_id"} <= set(a) for a in sample.record["annotations"])


class RecordingTracker:
    """Stands in for the tracking module: records what the evaluation logs."""

    def __init__(self) -> None:
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((metrics, step))

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((directory, artifact_path))


def evaluate_split(
    model: torch.nn.Module, split: Path, out: Path, batch_size: int, tta: bool = True, **tracking: Any
) -> Any:
    manifest = load_manifest(split)
    header = {
        "checkpoint": {"path": "debug (random init)"},
        "dataset": {"manifest": str(split), "manifest_sha256": manifest_sha256(manifest)},
    }
    return run_evaluation(
        model,
        eval_samples(manifest, 0, 1, 0),
        categories_of(split),
        EvalConfig(batch_size=batch_size, **EVAL),
        TTAConfig(**{**TTA, "enabled": tta}),
        out,
        header,
        anchor_distances=atd_function(preset("debug")),
        expected_images=manifest.num_samples,
        **tracking,
    )


def test_end_to_end_files_and_schema(debug_model: torch.nn.Module, split: Path, tmp_path: Path) -> None:
    tracker = RecordingTracker()
    run = evaluate_split(debug_model, split, tmp_path, batch_size=2, tracker=tracker, step=3)
    assert run is not None
    # Periodic evaluation: the epoch is the step, the files go under eval/epoch_003.
    [(logged, step)] = tracker.metrics
    assert step == 3 and tracker.artifacts == [(tmp_path, "eval/epoch_003")]
    assert {"plain/AP", "plain/AP50", "tta_one_to_one/AP", "tta_nms/AR100", "plain/ATD50"} <= set(logged)
    assert logged["plain/AP"] == run.metrics["plain"].stats["AP"]
    for name in (
        "metrics.json",
        "detections.json",
        "detections_tta.json",
        "detections_tta_nms.json",
        "pr_curve.png",
    ):
        assert (tmp_path / name).is_file(), name
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == ["143.jpg", "30.jpg", "92.jpg"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_images"] == 12 and metrics["schema_version"] == 1
    assert metrics["dataset"]["manifest_sha256"] == hashlib.sha256(split.read_bytes()).hexdigest()
    assert sorted(metrics["results"]) == ["plain", "tta_nms", "tta_one_to_one"]
    table = {c["id"]: c["name"] for c in categories_of(split)}
    for mode, block in metrics["results"].items():
        for name in STAT_NAMES:
            assert block[name] is None or 0.0 <= block[name] <= 1.0, (mode, name)
        assert set(block["per_class_AP"]) == {str(i) for i in table}
        assert all(v["name"] == table[int(k)] for k, v in block["per_class_AP"].items())
        assert set(block["ATD"]) == {"k", "value", "num_distances", "reason"} and block["ATD"]["k"] == 50
    # ATD(50) over the 82 non-crowd boxes (a few may be dropped as < 1 px after resizing); TTA has none.
    atd = metrics["results"]["plain"]["ATD"]
    assert 50 <= atd["num_distances"] <= 82 and 0.0 < atd["value"] < 4.0 and atd["reason"] is None
    assert metrics["results"]["tta_one_to_one"]["ATD"]["value"] is None
    assert metrics["settings"]["eval"]["batch_size"] == 2 and metrics["settings"]["world_size"] == 1
    assert metrics["timing"]["images_per_s"] > 0
    gt_ids = {int(k) for k in range(0)} | {
        s["id"] for s in json.loads((SAMPLE / "instances.json").read_text())["images"]
    }
    for name in ("detections.json", "detections_tta.json", "detections_tta_nms.json"):
        detections = json.loads((tmp_path / name).read_text())
        assert detections, name
        assert {d["image_id"] for d in detections} <= gt_ids
        assert {d["category_id"] for d in detections} <= set(table)
        assert all(len(d["bbox"]) == 4 and 0.0 <= d["score"] <= 1.0 for d in detections)
    plain = json.loads((tmp_path / "detections.json").read_text())
    per_image = {i: sum(d["image_id"] == i for d in plain) for i in gt_ids}
    assert max(per_image.values()) <= preset("debug").num_select


def test_metrics_do_not_depend_on_the_batch_size(
    debug_model: torch.nn.Module, split: Path, tmp_path: Path
) -> None:
    for batch_size in (1, 4):
        evaluate_split(debug_model, split, tmp_path / f"b{batch_size}", batch_size, tta=False)
    one, four = (json.loads((tmp_path / f"b{b}" / "metrics.json").read_text()) for b in (1, 4))
    assert one["results"] == four["results"] and one["num_images"] == four["num_images"] == 12
    assert (tmp_path / "b1" / "detections.json").read_bytes() == (
        tmp_path / "b4" / "detections.json"
    ).read_bytes()


def card_for(categories: list[dict[str, Any]], model: str = "debug", **changes: Any) -> ModelCard:
    return ModelCard(model=config_to_dict(replace(preset(model), **changes)), classes=categories, step=7)


def test_check_checkpoint_refuses_a_mismatch(split: Path) -> None:
    ours = categories_of(split)
    check_checkpoint(card_for(ours), ours, model=None)
    check_checkpoint(card_for(list(reversed(ours))), ours, model=preset("debug"))  # order does not matter
    with pytest.raises(
        CheckpointMismatchError, match=r"is a dino_r50_4scale model, the config asks for debug"
    ):
        check_checkpoint(card_for(ours, "dino_r50_4scale"), ours, model=preset("debug"))
    with pytest.raises(
        CheckpointMismatchError, match=r"custom model.*model.num_queries: checkpoint 50, config 30"
    ):
        check_checkpoint(card_for(ours, num_queries=50), ours, model=preset("debug"))
    o365 = [{"id": i, "name": f"o365_{i}"} for i in range(1, 366)]
    with pytest.raises(
        CheckpointMismatchError, match=r"class table \(365 classes\) does not match .* \(80\)"
    ):
        check_checkpoint(card_for(o365, num_classes=366), ours, model=None)
    renamed = [{**c, "name": "mug"} if c["id"] == 47 else c for c in ours]
    with pytest.raises(CheckpointMismatchError, match=r"named differently \[\(47, 'mug', 'cup'\)\]"):
        check_checkpoint(card_for(renamed), ours, model=None)
    with pytest.raises(CheckpointMismatchError, match=r"not below the checkpoint's num_classes=81"):
        check_checkpoint(card_for(ours, num_classes=81), ours, model=None)


STAGE_OVERRIDES = [
    "eval.short_side=160",
    "eval.max_size=256",
    "eval.num_workers=0",
    "eval.draw_images=1",
    "eval.atd_k=50",
    "device=cpu",
    "tta=multiscale_flip",
    "tta.scales=[128,160]",
    "tta.main_scale=160",
    "tta.max_size=256",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, debug_model: torch.nn.Module, split: Path) -> Path:
    directory = tmp_path_factory.mktemp("checkpoint") / "debug"
    save_model(directory, debug_model.state_dict(), card_for(categories_of(split)))
    return directory


def test_stage_refuses_a_mismatched_checkpoint_before_inference(
    checkpoint: Path, split: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The manifest without its shards: any inference would fail on reading them.
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(split, data / "manifest.json")
    other = tmp_path / "o365"
    shutil.copytree(checkpoint, other)
    card = json.loads((other / "model.json").read_text())
    card["classes"] = [{"id": i, "name": f"o365_{i}"} for i in range(1, 81)]
    (other / "model.json").write_text(json.dumps(card))
    cases = [
        (checkpoint, preset("dino_r50_4scale"), "is a debug model, the config asks for dino_r50_4scale"),
        (other, None, "class table (80 classes) does not match"),
    ]
    for directory, model, message in cases:
        cfg = EvalStageConfig(
            checkpoint=directory, data=data, out=tmp_path / "out", model=model, device="cpu"
        )
        assert run(cfg) == 2
        assert message in capsys.readouterr().err
        # Nothing but the MLflow store, whose run of this evaluation says it failed.
        store = {"mlflow.db", ".mlflow.db.lock", "mlartifacts"}
        assert {p.name for p in (tmp_path / "out").iterdir()} <= store
        client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert runs[0].info.status == "FAILED" and runs[0].data.tags["stage"] == "eval"
    # The same through the command line (model=<preset> is the model config group).
    argv = [
        "eval",
        f"checkpoint={checkpoint}",
        f"data={data}",
        f"out={tmp_path / 'cli'}",
        "model=dino_r50_4scale",
    ]
    assert cli_main([*argv, "device=cpu"]) == 2
    assert "is a debug model, the config asks for dino_r50_4scale" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "metrics.json").exists()


def test_cli_one_process_batch_1_and_two_processes_batch_4_write_the_same_results(
    checkpoint: Path, split: Path, tmp_path: Path
) -> None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    common = ["-m", "pipeline", "eval", f"checkpoint={checkpoint}", f"data={split}", *STAGE_OVERRIDES]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    commands = {
        "one": [sys.executable, *common, f"out={tmp_path / 'one'}", "eval.batch_size=1"],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            *common,
            f"out={tmp_path / 'two'}",
            "eval.batch_size=4",
        ],
    }
    procs = {
        k: subprocess.Popen(c, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for k, c in commands.items()
    }
    logs = {k: p.communicate(timeout=300)[0] for k, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), logs
    one, two = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("one", "two"))
    assert one["results"] == two["results"] and one["num_images"] == two["num_images"] == 12
    assert (one["settings"]["world_size"], two["settings"]["world_size"]) == (1, 2)
    assert one["checkpoint"]["preset"] == "debug" and one["checkpoint"]["step"] == 7
    assert sorted(one["results"]) == ["plain", "tta_nms", "tta_one_to_one"]
    for name in ("detections.json", "detections_tta.json", "detections_tta_nms.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is visible")
def test_eval_on_cuda_without_a_gpu_is_an_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(
        ["eval", f"checkpoint={tmp_path}", f"data={tmp_path}", "device=cuda", f"out={tmp_path / 'o'}"]
    )
    assert code == 2 and "device=cuda but no CUDA GPU is visible; use device=cpu" in capsys.readouterr().err
