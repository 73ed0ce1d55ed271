"""One training code path, three ways to start its processes: a single process, torchrun, Ray Train.

``launch(cfg, worker)`` runs ``worker(cfg)`` (e.g. :func:`pipeline.train.stage.run_training`) on every
process of the group ``cfg.launcher`` describes:

- ``single``: this process alone, as rank 0 of a one-process group (MASTER_ADDR=127.0.0.1, a free port),
  so DeepSpeed runs exactly as it does on many ranks.
- ``torchrun``: the process group is in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  MASTER_PORT) set by ``torchrun -m pipeline ...``, the ``deepspeed`` launcher (``deepspeed --no_local_rank
  --module pipeline ...``: Hydra would reject its ``--local_rank`` argument) or ``srun`` around torchrun under
  Slurm (what ``jobs/`` uses); multi-node needs nothing beyond that environment.
- ``ray``: Ray Train's ``TorchTrainer`` starts ``launcher.num_workers`` workers on a local Ray (default)
  or the cluster at ``launcher.ray_address``; Ray Train sets up the process group (gloo on CPUs, NCCL on
  GPUs) and DeepSpeed reuses it. After a worker failure Ray restarts the group up to
  ``launcher.max_failures`` times, and each worker resumes from ``<out>/checkpoints/latest`` by itself:
  ``out`` must be on storage that every node sees (Ray's own run directory is ``<out>/ray``).
- ``auto``: ``torchrun`` when WORLD_SIZE is in the environment, else ``single``.

This module is one of the three allowed to import Ray (import-linter contract); it imports it only for
``ray``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pipeline.train.config import TrainStageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
GROUP_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Passed to Ray workers from the driver's environment when set (thread counts, DeepSpeed's accelerator).
WORKER_ENV = ("OMP_NUM_THREADS", "DS_ACCELERATOR", "RAY_USAGE_STATS_ENABLED", "MLFLOW_DISABLE_TELEMETRY")


def resolve_kind(kind: str) -> str:
    """``auto`` -> ``torchrun`` inside a launcher's environment (WORLD_SIZE set), else ``single``."""
    if kind != "auto":
        return kind
    return "torchrun" if "WORLD_SIZE" in os.environ else "single"


def launch(cfg: TrainStageConfig, worker: Callable[[TrainStageConfig], T]) -> T | None:
    """Run ``worker(cfg)`` on every process of the configured group.

    Returns:
        ``worker``'s return value on this process for ``single`` and ``torchrun``; None for ``ray`` (the
        workers ran elsewhere; read what they wrote in ``cfg.out``).

    Raises:
        RuntimeError: ``torchrun`` without the launcher's environment; a Ray run that failed (with the
            workers' error).
    """
    kind = resolve_kind(cfg.launcher.kind)
    if kind == "single":
        with _single_process_group():
            return worker(cfg)
    if kind == "torchrun":
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(
                f"launcher.kind=torchrun but {missing} are not set: start with `torchrun --nproc_per_node N "
                "-m pipeline ...` (or use launcher.kind=single / ray)"
            )
        return worker(cfg)
    if kind == "ray":
        _run_on_ray(cfg, worker)
        return None
    raise ValueError(f"launcher.kind must be auto, single, torchrun or ray, got {kind!r}")


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _single_process_group() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in GROUP_ENV}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        yield
    finally:
        # The one-process group stays for the life of the process: DeepSpeed caches its groups in module
        # globals, so a second training in this process (the next job of a basic-launcher sweep) fails
        # on a destroyed group ("Group ... is not registered"); the next job reuses this one.
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop: the same worker function, in the group Ray Train set up."""
    config["worker"](config["cfg"])


class LaunchError(ValueError):
    """A launch request this machine cannot serve (the message names the keys to change)."""


def _run_on_ray(cfg: TrainStageConfig, worker: Callable[[TrainStageConfig], Any]) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    launcher = cfg.launcher
    out = Path(cfg.out).resolve()
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if launcher.ray_address:
            ray.init(address=launcher.ray_address, log_to_driver=True)
        else:
            # A local Ray's workers import this package from the driver's import path.
            path = os.pathsep.join(p or os.getcwd() for p in sys.path)
            ray.init(
                address="local",
                include_dashboard=False,
                runtime_env={"env_vars": {"PYTHONPATH": path}},
                log_to_driver=True,
            )
        started = True
    try:
        if started and not launcher.ray_address:
            # A local Ray has what this machine has: Ray Train would wait for the rest forever.
            have = ray.cluster_resources()
            cpus, gpus = (
                launcher.num_workers * launcher.cpus_per_worker,
                launcher.num_workers * launcher.use_gpu,
            )
            if cpus > have.get("CPU", 0) or gpus > have.get("GPU", 0):
                each = f"{launcher.cpus_per_worker:g} CPUs{' and a GPU' if launcher.use_gpu else ''} each"
                raise LaunchError(
                    f"launcher.num_workers={launcher.num_workers} workers of launcher.cpus_per_worker={each} "
                    f"do not fit this machine's local Ray ({have.get('CPU', 0):g} CPUs, "
                    f"{have.get('GPU', 0):g} GPUs): ask for less, or give launcher.ray_address of a cluster"
                )
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"cfg": cfg, "worker": worker},
            scaling_config=ScalingConfig(
                num_workers=launcher.num_workers,
                use_gpu=launcher.use_gpu,
                resources_per_worker={
                    "CPU": launcher.cpus_per_worker,
                    **({"GPU": 1} if launcher.use_gpu else {}),
                },
                placement_strategy=launcher.placement_strategy,
            ),
            run_config=RunConfig(
                name=f"{cfg.stage}-{out.name}",
                storage_path=str(out / "ray"),
                failure_config=FailureConfig(max_failures=launcher.max_failures),
                worker_runtime_env={"env_vars": env} if env else None,
            ),
        )
        log.info(
            "Ray Train: %d worker(s)%s on %s",
            launcher.num_workers,
            " with a GPU each" if launcher.use_gpu else "",
            launcher.ray_address or "a local Ray",
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"the Ray Train run failed: {result.error}") from result.error
    finally:
        if started:
            ray.shutdown()
