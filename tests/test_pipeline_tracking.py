"""Tracking (``pipeline.tracking``) against a SQLite store and a real ``mlflow server`` on 127.0.0.1,
read back through the MLflow client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow import MlflowClient
from pipeline_helpers import free_port, stop_process_group

import pipeline.orchestrate as orchestrate
from pipeline.orchestrate_config import RunConfig, StageSpec
from pipeline.tracking import NullTracker, create_run, end_run, git_commit, start_run
from pipeline.tracking_config import TrackingConfig


@dataclass(frozen=True)
class _Section:
    lr: float = 1e-4
    layers: list[int] = field(default_factory=lambda: [6, 6])


@dataclass(frozen=True)
class _StageConfig:
    out: Path = Path("/tmp/x")
    name: str = "demo"
    section: _Section = field(default_factory=_Section)


def _log_a_stage(cfg: TrackingConfig, out: Path) -> str:
    (out / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text('{"AP": 0.5}')
    with start_run(
        cfg, out, "pretrain", config=_StageConfig(), tags={"dataset.manifest_sha256": "ab12"}
    ) as t:
        assert t.active
        t.log_metrics({"train/loss": 2.0}, step=1)
        t.log_metrics({"train/loss": 1.0}, step=2)
        t.log_artifact(out / "metrics.json")
        t.log_artifacts(out, artifact_path="eval")
        return t.run_id


def _check_stage_run(client: MlflowClient, run_id: str, experiment: str) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == experiment
    assert run.data.params == {
        "out": "/tmp/x",
        "name": "demo",
        "section.lr": "0.0001",
        "section.layers": "[6, 6]",
    }
    tags = run.data.tags
    assert tags["stage"] == "pretrain"
    assert tags["git.commit"] == git_commit() == tags["mlflow.source.git.commit"]
    assert tags["world_size"] == "1"
    assert tags["dataset.manifest_sha256"] == "ab12"
    assert tags["mlflow.runName"] == "pretrain"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (1, 2.0),
        (2, 1.0),
    ]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "metrics.json", "eval"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/metrics.json"}


def test_a_stage_run_in_the_sqlite_store_of_its_output_directory(tmp_path: Path) -> None:
    cfg = TrackingConfig(experiment="tracking-test")
    run_id = _log_a_stage(cfg, tmp_path)
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    _check_stage_run(client, run_id, "tracking-test")
    # Artifacts sit beside the database, inside the output directory.
    assert (tmp_path / "mlartifacts").is_dir()
    config_yaml = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl")))
    assert "lr: 0.0001" in config_yaml.read_text()


def test_nested_runs_and_continuing_a_run_from_another_tracker(tmp_path: Path) -> None:
    cfg = TrackingConfig(experiment="nesting")
    parent = create_run(cfg, tmp_path, "pipeline")
    child_cfg = TrackingConfig(
        experiment="ignored: the parent's experiment wins", parent_run_id=parent.run_id
    )
    with start_run(child_cfg, tmp_path, "shard") as child:
        child.log_metrics({"samples": 12})
    made_for_stage = create_run(TrackingConfig(parent_run_id=parent.run_id), tmp_path, "eval")
    # A stage given run_id logs into that run and leaves ending it to its creator.
    with start_run(TrackingConfig(run_id=made_for_stage.run_id), tmp_path, "eval") as stage:
        stage.log_metrics({"plain/AP": 0.25})
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(made_for_stage.run_id).info.status == "RUNNING"
    end_run(made_for_stage)
    end_run(parent)
    runs = client.search_runs([client.get_experiment_by_name("nesting").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"pipeline", "shard", "eval"}
    for name in ("shard", "eval"):
        assert by_name[name].data.tags["mlflow.parentRunId"] == parent.run_id
        assert by_name[name].info.status == "FINISHED"
    assert by_name["eval"].data.metrics == {"plain/AP": 0.25}


def test_a_failing_stage_marks_its_run_failed(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), start_run(TrackingConfig(), tmp_path, "finetune") as t:
        run_id = t.run_id
        raise RuntimeError("boom")
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).info.status == "FAILED"


def test_only_rank_zero_logs_and_tracking_none_logs_nothing(tmp_path: Path) -> None:
    with start_run(TrackingConfig(), tmp_path / "rank1", "pretrain", rank=1) as t:
        assert isinstance(t, NullTracker) and not t.active
        t.log_metrics({"x": 1.0})
    with start_run(TrackingConfig(kind="none"), tmp_path / "none", "pretrain") as t:
        assert isinstance(t, NullTracker)
    assert not (tmp_path / "rank1").exists() and not (tmp_path / "none").exists()


def test_an_unreachable_server_warns_and_the_stage_goes_on(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens here once the socket is closed
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{port}", connect_timeout_s=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with start_run(cfg, tmp_path, "pretrain") as t:
            t.log_metrics({"loss": 1.0})
    assert isinstance(t, NullTracker)
    assert any(f"127.0.0.1:{port} is unreachable" in str(w.message) for w in caught)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "wandb"}, "tracking.kind must be one of"),
        ({"uri": "localhost:5000"}, "tracking.uri must be a URI"),
        ({"run_id": "a", "parent_run_id": "b"}, "exclude each other"),
    ],
)
def test_bad_tracking_settings_are_refused_naming_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrackingConfig(**changes)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 (its own process group, stopped as a group)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [
        str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (root / "server.log").open("w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield uri
    finally:
        stop_process_group(server, timeout_s=30)
        log.close()


def test_a_stage_run_on_a_real_mlflow_server(mlflow_server: str, tmp_path: Path) -> None:
    cfg = TrackingConfig(uri=mlflow_server, experiment="server-test")
    run_id = _log_a_stage(cfg, tmp_path)
    assert not (tmp_path / "mlflow.db").exists()  # nothing local: the server has it
    client = MlflowClient(mlflow_server)
    _check_stage_run(client, run_id, "server-test")
    downloaded = Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path / "dl")))
    assert downloaded.read_text() == '{"AP": 0.5}'


def test_an_interrupted_run_ends_the_running_stage_s_run_too(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C while a stage runs: the stage's nested MLflow run ends KILLED with the parent, not RUNNING
    forever; the summary says interrupted."""

    def interrupted(entry: object, config: object) -> tuple[int, str]:
        raise KeyboardInterrupt

    monkeypatch.setattr(orchestrate, "run_stage", interrupted)
    monkeypatch.setattr(orchestrate, "connect_ray", lambda cfg: (False, ""))
    manifest = tmp_path / "data" / "manifest.json"  # exists: `run` checks its stages' outside inputs first
    manifest.parent.mkdir()
    manifest.write_text("{}")
    spec = StageSpec(command="pretrain", experiment="demo_pretrain", overrides=[f"data={manifest}"])
    cfg = RunConfig(name="interrupted", out=tmp_path, stages={"train": spec})
    with pytest.raises(KeyboardInterrupt):
        orchestrate.run(cfg)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    statuses = {("mlflow.parentRunId" in r.data.tags, r.info.status) for r in runs}
    assert statuses == {(True, "KILLED"), (False, "KILLED")}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["stages"]["train"]["status"] == "failed"
