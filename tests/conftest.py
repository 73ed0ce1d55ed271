"""Shared pytest setup: test helpers importable by name, the ``cuda`` marker, paths to test data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"
COCO_SAMPLE = DATA_DIR / "coco_sample"

# Helper modules next to the tests (e.g. official_fixture) are imported by name.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``cuda`` where no GPU is present (they run on the GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """The 12-image COCO sample: ``images/*.jpg`` and ``instances.json``."""
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray (2 CPUs, no dashboard) shared by every test that shards; the stage reuses it."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}},
        )
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def coco_sample_shards(ray_session, coco_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The COCO sample sharded 2 images per shard (6 shards); returns its manifest path. Read-only."""
    from pipeline.data.config import DatasetConfig, ShardConfig, ShardStageConfig
    from pipeline.data.shard import run_shard

    out = tmp_path_factory.mktemp("coco_sample_shards")
    cfg = ShardStageConfig(
        out=out,
        dataset=DatasetConfig(
            kind="coco_format",
            name="sample",
            images=coco_sample / "images",
            annotations=coco_sample / "instances.json",
        ),
        shard=ShardConfig(images_per_shard=2),
    )
    return run_shard(cfg).manifest_path
