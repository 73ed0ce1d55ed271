"""The Ray Train launcher: 2 CPU workers on a local Ray (one of them killed mid-run, Ray's failure config
restarts the group, which resumes from ``latest``), and a two-node Ray cluster simulated on this machine
(``ray.cluster_utils.Cluster``) with one worker per node. Same training code as torchrun, same losses."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from conftest import TRAIN_TEST_OVERRIDES, logged_losses, reference_overrides, train_command, train_env

from pipeline.checkpoint import read_weight_file


def _ray_workers(pid: int) -> list:
    """The Ray Train worker processes started under the driver ``pid`` (a local Ray is its child)."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if "RayTrainWorker" in " ".join(child.cmdline()):
                found.append(child)
    return found


def test_ray_train_worker_failure_resumes_to_the_reference_result(
    reference_run: Path, demo_shards: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    overrides = [
        *reference_overrides(demo_shards, out),
        "launcher=ray",
        "launcher.num_workers=2",
        "launcher.max_failures=1",
    ]
    log_path = tmp_path / "ray.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            train_command("pretrain", overrides),
            cwd=tmp_path,
            env=train_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            latest = out / "checkpoints" / "latest"
            deadline = time.monotonic() + 300
            while not latest.is_file() and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert driver.poll() is None, log_path.read_text()[-4000:]
            workers = _ray_workers(driver.pid)
            assert len(workers) == 2, [w.cmdline() for w in workers]
            killed_at = latest.read_text()
            workers[-1].send_signal(signal.SIGKILL)  # one worker dies; Ray Train restarts the group
            driver.wait(timeout=400)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    text = log_path.read_text()
    assert driver.returncode == 0, text[-5000:]
    assert "[FailurePolicy] RETRY" in text, text[-3000:]
    assert f"resumed from {out / 'checkpoints'}/step_" in text
    assert killed_at.startswith("step_")
    # The restarted workers continue from latest: the run ends exactly as the uninterrupted torchrun run.
    assert logged_losses(out) == logged_losses(reference_run)
    for name in ("model.safetensors", "raw/model.safetensors"):
        ours, reference = read_weight_file(out / name), read_weight_file(reference_run / name)
        assert all(torch.equal(ours[k], reference[k]) for k in reference), name


CLUSTER_SCRIPT = textwrap.dedent(
    """
    import sys
    from ray.cluster_utils import Cluster
    from pipeline.config import compose, validate
    from pipeline.launch import launch
    from pipeline.train.stage import read_result, run_training

    out, overrides = sys.argv[1], sys.argv[2:]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        nodes = cluster.list_all_nodes()
        print("nodes", len(nodes), flush=True)
        cfg = validate(compose("pretrain", [*overrides, f"launcher.ray_address={cluster.address}"]))
        launch(cfg, run_training)
        print("steps", read_result(out).steps, flush=True)
    finally:
        cluster.shutdown()
    """
)


def test_two_node_ray_cluster_one_worker_per_node(demo_shards: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    overrides = [
        *TRAIN_TEST_OVERRIDES,
        f"data={demo_shards['pretrain/train']}",
        f"out={out}",
        "train.max_steps=2",
        "tracking=none",
        "launcher=ray",
        "launcher.num_workers=2",
        "launcher.cpus_per_worker=1",
        "launcher.placement_strategy=STRICT_SPREAD",
        "launcher.max_failures=0",
    ]
    result = subprocess.run(
        [sys.executable, "-c", CLUSTER_SCRIPT, str(out), *overrides],
        cwd=tmp_path,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-5000:]
    # Two nodes of one CPU each and two workers of one CPU each under STRICT_SPREAD: one worker per node.
    assert "nodes 2" in text and "steps 2" in text
    assert "world_rank=1" in text and "2 rank(s)" in text
    assert (out / "model.json").is_file()


def test_a_request_larger_than_the_local_ray_is_refused_not_waited_for(
    demo_shards: dict[str, Path], tmp_path: Path
) -> None:
    """Ray Train would wait forever for workers a local Ray cannot place (and not stop on Ctrl-C)."""
    overrides = [
        *TRAIN_TEST_OVERRIDES,
        f"data={demo_shards['pretrain/train']}",
        f"out={tmp_path / 'out'}",
        "tracking=none",
        "launcher=ray",
        "launcher.num_workers=64",
        "launcher.cpus_per_worker=64",
    ]
    env = {k: v for k, v in train_env().items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        train_command("pretrain", overrides), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert (
        "launcher.num_workers=64 workers of launcher.cpus_per_worker=64 CPUs each do not fit" in result.stderr
    )
