"""``python -m pipeline finetune --multirun train.lr=a,b`` of the debug preset with Hydra's basic launcher
and with the Ray launcher (hydra-ray-launcher) on a local Ray and on a running cluster: each job its own
output directory and its own MLflow run, both in one experiment of one store, read back through the MLflow
client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from pipeline_helpers import CLIENT_ENV, running_ray_cluster

from dino_core import build_dino, preset
from dino_core.config import config_to_dict
from pipeline.checkpoint import ModelCard, save_model
from pipeline.data.config import DatasetConfig, DemoDataConfig, ShardConfig, ShardStageConfig
from pipeline.data.demo_dataset import PRETRAIN_CLASSES, make_demo_data
from pipeline.data.shard import run_shard


@pytest.fixture(scope="module")
def finetune_inputs(ray_session, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny fine-tuning split (sharded) and a pretraining model directory to start from."""
    root = tmp_path_factory.mktemp("sweep_inputs")
    demo = make_demo_data(
        DemoDataConfig(
            out=root / "data", pretrain_train=1, pretrain_val=1, finetune_train=4, finetune_val=1,
            min_size=64, max_size=96,
        )
    )  # fmt: skip
    split = demo.split("finetune", "train")
    dataset = DatasetConfig(name="demo_finetune", images=split.images, annotations=split.annotations)
    summary = run_shard(
        ShardStageConfig(out=root / "shards", dataset=dataset, shard=ShardConfig(images_per_shard=2))
    )
    model = preset("debug")
    model = type(model)(**{**model.__dict__, "num_classes": 10})
    torch.manual_seed(0)
    classes = [{"id": i, "name": n} for i, n in PRETRAIN_CLASSES]
    save_model(root / "pretrain", build_dino(model).state_dict(), ModelCard(config_to_dict(model), classes))
    return summary.manifest_path, root / "pretrain"


def _sweep(
    manifest: Path, init: Path, sweep_dir: Path, *launcher: str, ray_address: str = ""
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "pipeline", "finetune", "--multirun", "experiment=demo_finetune",
        "model=debug", "launcher=single", f"init={init}", f"data={manifest}", "train.epochs=1",
        "train.lr_drop_epochs=[]",
        "train.max_steps=2", "train.lr=1e-4,3e-4", f"hydra.sweep.dir={sweep_dir}", *launcher,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"OMP_NUM_THREADS": "1", **({"RAY_ADDRESS": ray_address, **CLIENT_ENV} if ray_address else {})}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def _check_sweep(result: subprocess.CompletedProcess, sweep_dir: Path) -> None:
    assert result.returncode == 0, result.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{sweep_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dino")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2, [r.info.run_name for r in runs]
    by_lr = {r.data.params["train.lr"]: r for r in runs}
    assert set(by_lr) == {"0.0001", "0.0003"}
    for job, lr in enumerate(("0.0001", "0.0003")):
        run = by_lr[lr]
        assert run.info.status == "FINISHED"
        assert run.data.tags["stage"] == "finetune"
        assert run.data.params["out"] == str(sweep_dir / str(job))
        assert "train/loss" in run.data.metrics
        assert json.loads((sweep_dir / str(job) / "train_result.json").read_text())["steps"] == 2
        assert (sweep_dir / str(job) / "model.safetensors").is_file()


def test_a_two_job_sweep_with_the_basic_launcher(finetune_inputs, tmp_path: Path) -> None:
    manifest, init = finetune_inputs
    _check_sweep(_sweep(manifest, init, tmp_path / "sweep"), tmp_path / "sweep")


def test_a_two_job_sweep_with_the_ray_launcher(finetune_inputs, tmp_path: Path) -> None:
    manifest, init = finetune_inputs
    launcher = ["hydra/launcher=ray_sweep", "+hydra.launcher.ray.init.num_cpus=2"]
    result = _sweep(manifest, init, tmp_path / "sweep", *launcher)
    _check_sweep(result, tmp_path / "sweep")
    assert "Ray Launcher is launching 2 jobs" in result.stdout + result.stderr


def test_a_two_job_sweep_with_the_ray_launcher_on_a_running_cluster(finetune_inputs, tmp_path: Path) -> None:
    manifest, init = finetune_inputs
    with running_ray_cluster(tmp_path / "ray_head.log") as address:
        result = _sweep(manifest, init, tmp_path / "sweep", "hydra/launcher=ray_sweep", ray_address=address)
    _check_sweep(result, tmp_path / "sweep")
    assert "Connecting to existing Ray cluster" in result.stdout + result.stderr


def test_a_failing_sweep_job_fails_the_sweep_with_either_launcher(finetune_inputs, tmp_path: Path) -> None:
    manifest, _ = finetune_inputs
    for launcher in ([], ["hydra/launcher=ray_sweep", "+hydra.launcher.ray.init.num_cpus=2"]):
        # init names no model directory: each job refuses it at run time.
        result = _sweep(manifest, tmp_path / "missing", tmp_path / f"sweep{len(launcher)}", *launcher)
        assert result.returncode != 0
        assert "is not the output of a pretraining run" in result.stdout + result.stderr


def test_a_sweep_without_a_sweep_dir_writes_under_multirun_of_the_command(tmp_path: Path) -> None:
    """The default sweep folder is absolute (<working directory>/multirun/<command>/<time>), fixed before
    Hydra starts: one resolved by Hydra's sweeper from ${hydra:runtime.cwd} failed every sweep."""
    command = [
        sys.executable, "-m", "pipeline", "make-demo-data", "--multirun", "seed=0,1", "pretrain_train=1",
        "pretrain_val=1", "finetune_train=1", "finetune_val=1", "min_size=64", "max_size=64",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun" / "make_demo_data").iterdir()
    for job in ("0", "1"):
        assert (sweep / job / "finetune" / "annotations" / "instances_val.json").is_file()
