"""``python -m pipeline run`` end to end on a tiny embedded dataset with a few training steps: the stages
on a local Ray (Ray tasks, Ray Train), completion records, skipping finished stages, a failed stage rerun
alone, summary.json, and the MLflow parent and nested runs read back through the client."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pipeline_helpers import CLIENT_ENV, running_ray_cluster

from pipeline.config import hydra_value
from pipeline.tracking import git_commit

STAGES = [
    "demo_data",
    "shard_pretrain_train",
    "shard_pretrain_val",
    "shard_finetune_train",
    "shard_finetune_val",
    "pretrain",
    "finetune",
    "eval",
]
TINY = [
    'stages.demo_data.extra=["pretrain_train=8","pretrain_val=4","finetune_train=8","finetune_val=4",'
    '"min_size=64","max_size=96"]',
    'stages.pretrain.extra=["train.epochs=1","train.lr_drop_epochs=[]","train.max_steps=2"]',
    'stages.finetune.extra=["train.epochs=1","train.lr_drop_epochs=[]","train.max_steps=2"]',
    "ray.num_cpus=2",
    "ray.dashboard=false",
]


def _run(
    out: Path, *overrides: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", f"out={hydra_value(str(out))}", *TINY, *overrides],
        capture_output=True,
        text=True,
        env={**base, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    return result, summary


def _statuses(summary: dict) -> dict[str, str]:
    return {name: stage["status"] for name, stage in summary["stages"].items()}


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three runs into one directory: eval failing (a local Ray), then fixed (on a running Ray cluster, as
    an operator's run joins one), then again with nothing to do. The folder's name is syntax to Hydra's
    override grammar unquoted: every stage gets it quoted."""
    root = tmp_path_factory.mktemp("run")
    out = root / "demo run (1), v2"
    missing = out / "no_such_model"
    first = _run(out, f'stages.eval.extra=["checkpoint={missing}"]')
    records_after_first = {s: (out / s / "COMPLETED.json").is_file() for s in STAGES}
    with running_ray_cluster(root / "ray_head.log") as address:
        second = _run(out, f"ray.address={address}", env=CLIENT_ENV)
    third = _run(out)
    return {"out": out, "runs": [first, second, third], "records_after_first": records_after_first}


def test_a_failed_stage_leaves_no_record_and_the_others_complete(pipeline_runs: dict) -> None:
    result, summary = pipeline_runs["runs"][0]
    assert result.returncode == 1, result.stderr[-3000:]
    assert _statuses(summary) == {**dict.fromkeys(STAGES[:-1], "complete"), "eval": "failed"}
    assert summary["stages"]["eval"]["error"]
    assert pipeline_runs["records_after_first"] == {**dict.fromkeys(STAGES[:-1], True), "eval": False}
    assert summary["status"] == "failed"


def test_the_failed_stage_reruns_alone(pipeline_runs: dict) -> None:
    result, summary = pipeline_runs["runs"][1]
    assert result.returncode == 0, result.stderr[-3000:]
    assert _statuses(summary) == {**dict.fromkeys(STAGES[:-1], "skipped"), "eval": "complete"}
    evaluation = summary["evaluation"]
    for label in ("without_tta", "with_tta"):
        for stat in ("AP", "AP50"):
            assert 0.0 <= evaluation[label][stat] <= 1.0
    assert "Connecting to existing Ray cluster" in result.stderr
    assert summary["ray"]["address"].endswith(tuple("0123456789"))
    # The printed summary table and the MLflow UI command.
    assert "AP without TTA" in result.stdout and "AP with TTA" in result.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{pipeline_runs['out']}/mlflow.db" in result.stdout


def test_a_rerun_skips_every_finished_stage_without_starting_ray(pipeline_runs: dict) -> None:
    result, summary = pipeline_runs["runs"][2]
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(_statuses(summary).values()) == {"skipped"}
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert summary["evaluation"] == pipeline_runs["runs"][1][1]["evaluation"]


def test_summary_and_records_describe_every_stage(pipeline_runs: dict) -> None:
    out = pipeline_runs["out"]
    _, summary = pipeline_runs["runs"][1]
    for name in STAGES:
        stage = summary["stages"][name]
        record = json.loads((out / name / "COMPLETED.json").read_text())
        assert record["stage"] == name and record["config_sha256"] and record["output_id"]
        assert record["command_line"].startswith(f"python -m pipeline {stage['command']} ")
        assert (out / name / "config.yaml").is_file()
        assert Path(stage["out"]).is_dir() and stage["wall_s"] > 0
    assert summary["stages"]["shard_finetune_train"]["metrics"]["samples"] == 8
    assert summary["stages"]["pretrain"]["metrics"]["steps"] == 2
    assert json.loads((out / "finetune" / "COMPLETED.json").read_text())["upstream"] == {
        name: json.loads((out / name / "COMPLETED.json").read_text())["output_id"]
        for name in ("pretrain", "shard_finetune_train", "shard_finetune_val")
    }
    assert (out / "eval" / "metrics.json").is_file() and (out / "eval" / "detections_tta.json").is_file()


def test_changing_a_stage_reruns_it_and_what_reads_it(pipeline_runs: dict) -> None:
    out = pipeline_runs["out"]
    changed = 'stages.finetune.extra=["train.epochs=1","train.lr_drop_epochs=[]","train.max_steps=1"]'
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            f"out={hydra_value(str(out))}",
            *TINY[:2],
            changed,
            "dry_run=true",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plan = dict(line.split(": ", 1) for line in result.stdout.splitlines() if not line.startswith(" "))
    assert plan == {
        **dict.fromkeys(STAGES[:6], "skip (complete for this config)"),
        "finetune": "run",
        "eval": "run (an input stage runs)",
    }
    forced = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "run",
            f"out={hydra_value(str(out))}",
            *TINY[:2],
            "force=[finetune]",
            "dry_run=true",
        ],
        capture_output=True,
        text=True,
    )
    assert forced.returncode == 0, forced.stderr[-3000:]
    plan = dict(line.split(": ", 1) for line in forced.stdout.splitlines() if not line.startswith(" "))
    assert (plan["pretrain"], plan["finetune"]) == ("skip (complete for this config)", "run (forced)")


def test_mlflow_holds_a_parent_run_per_run_and_a_nested_run_per_stage(pipeline_runs: dict) -> None:
    out = pipeline_runs["out"]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.status for p in parents] == ["FAILED", "FINISHED", "FINISHED"]
    children = {p.info.run_id: [] for p in parents}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags:
            children[run.data.tags["mlflow.parentRunId"]].append(run)
    first, second, third = (children[p.info.run_id] for p in parents)
    assert sorted(r.info.run_name for r in first) == sorted(STAGES)
    assert [(r.info.run_name, r.info.status) for r in second] == [("eval", "FINISHED")]
    assert third == []
    by_name = {r.info.run_name: r for r in first}
    assert by_name["eval"].info.status == "FAILED"
    for name, run in by_name.items():
        tags = run.data.tags
        assert tags["stage"] == name and tags["git.commit"] == git_commit()
        assert "world_size" in tags and run.data.params, name
    # The training stages logged into the nested run made for them: their curves and their own params.
    pretrain = by_name["pretrain"]
    assert pretrain.data.params["train.max_steps"] == "2"
    assert "train/loss" in pretrain.data.metrics and "dataset.manifest_sha256" in pretrain.data.tags
    # Their curves hold their own points only (run's summary values are not logged into them again).
    assert [m.step for m in client.get_metric_history(pretrain.info.run_id, "train/loss")] == [2]
    shard = by_name["shard_pretrain_train"]
    manifest = out / "shards" / "demo_pretrain" / "train" / "manifest.json"
    assert shard.data.tags["dataset.manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert {a.path for a in client.list_artifacts(shard.info.run_id)} >= {"config.yaml", "manifest.json"}
    evaluation = next(r for r in second if r.info.run_name == "eval")
    assert {"metrics.json", "pr_curve.png"} <= {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert "plain/AP" in evaluation.data.metrics and "tta_one_to_one/AP50" in evaluation.data.metrics
    assert len(client.get_metric_history(evaluation.info.run_id, "plain/AP")) == 1


def test_a_changed_stage_reruns_with_the_stages_reading_it_keeping_the_replaced_output(
    pipeline_runs: dict,
) -> None:
    """Runs last: it changes the directory the other tests read."""
    out = pipeline_runs["out"]
    old_record = json.loads((out / "finetune" / "COMPLETED.json").read_text())
    # The first run's failed eval (another checkpoint) was set aside by the second run.
    assert len(list(out.glob("eval.replaced-*"))) == 1
    result, summary = _run(
        out, 'stages.finetune.extra=["train.epochs=1","train.lr_drop_epochs=[]","train.max_steps=1"]'
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _statuses(summary) == {
        **dict.fromkeys(STAGES[:6], "skipped"),
        "finetune": "complete",
        "eval": "complete",
    }
    assert summary["stages"]["finetune"]["metrics"]["steps"] == 1
    # The replaced run's output was moved aside whole, not resumed from or refused as another run's.
    (replaced,) = out.glob("finetune.replaced-*")
    assert json.loads((replaced / "COMPLETED.json").read_text()) == old_record
    assert (replaced / "model.safetensors").is_file()
    assert len(list(out.glob("eval.replaced-*"))) == 2 and (out / "eval" / "metrics.json").is_file()
    assert not list(out.glob("pretrain.replaced-*"))
    # An interrupted run (no record) of that config is not resumed by a run of another config. The same
    # run gives a shard stage other settings: its finished split, which the stage itself refuses to write
    # over, is moved aside as well.
    (out / "finetune" / "COMPLETED.json").unlink()
    split = out / "shards" / "demo_finetune" / "val"
    old_manifest = (split / "manifest.json").read_bytes()
    result, summary = _run(out, 'stages.shard_finetune_val.extra=["shard.decode_check=draft"]')
    assert result.returncode == 0, result.stderr[-3000:]
    assert _statuses(summary) == {
        **dict.fromkeys([*STAGES[:4], "pretrain"], "skipped"),
        "shard_finetune_val": "complete",
        "finetune": "complete",
        "eval": "complete",
    }
    assert summary["stages"]["finetune"]["metrics"]["steps"] == 2
    assert len(list(out.glob("finetune.replaced-*"))) == 2
    (replaced_split,) = split.parent.glob("val.replaced-*")
    assert (replaced_split / "manifest.json").read_bytes() == old_manifest
    assert json.loads((split / "manifest.json").read_text())["config"]["decode_check"] == "draft"
    # A shard stage rerun with the same settings (forced here; or its input stage wrote new image bytes
    # under the same annotations) reshards: the split is moved aside, not taken as finished.
    result, summary = _run(
        out,
        'stages.shard_finetune_val.extra=["shard.decode_check=draft"]',
        "force=[shard_finetune_val]",
        "only=[shard_finetune_val]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary["stages"]["shard_finetune_val"]["status"] == "complete"
    assert "nothing to do" not in result.stdout + result.stderr
    assert len(list(split.parent.glob("val.replaced-*"))) == 2 and (split / "manifest.json").is_file()
