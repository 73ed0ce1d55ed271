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
            address="local",
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


def write_coco_shards(images: Path, annotations: Path, split_dir: Path, per_shard: int) -> Path:
    """Shard a COCO-format split by data contracts 1 and 2 without Ray (plain tars + manifest), for tests
    that need many small shard sets fast; returns the manifest path. The data stage's own sharding is
    tested in test_data_*."""
    import hashlib
    import io
    import json
    import tarfile

    from pipeline.data.manifest import (
        SCHEMA_VERSION,
        AnnotationFile,
        Category,
        Manifest,
        ShardEntry,
        write_manifest,
    )

    coco = json.loads(annotations.read_text())
    per_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(
            {k: ann[k] for k in ("id", "category_id", "bbox", "area", "iscrowd")}
        )
    records = sorted(coco["images"], key=lambda im: im["id"])
    dataset, split = split_dir.parent.name, split_dir.name
    split_dir.mkdir(parents=True)
    entries = []
    for start in range(0, len(records), per_shard):
        chunk = records[start : start + per_shard]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for im in chunk:
                record = {k: im[k] for k in ("id", "file_name", "width", "height")}
                record["annotations"] = per_image.get(im["id"], [])
                for member, data in (
                    (f"{im['id']:012d}.jpg", (images / im["file_name"]).read_bytes()),
                    (f"{im['id']:012d}.json", json.dumps(record).encode()),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        name = f"{dataset}-{split}-{start // per_shard:06d}.tar"
        (split_dir / name).write_bytes(buffer.getvalue())
        entries.append(
            ShardEntry(
                name,
                len(chunk),
                sum(len(per_image.get(im["id"], [])) for im in chunk),
                len(buffer.getvalue()),
                hashlib.sha256(buffer.getvalue()).hexdigest(),
            )
        )
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        dataset=dataset,
        split=split,
        kind="coco_format",
        num_samples=len(records),
        num_annotations=len(coco["annotations"]),
        shards=entries,
        categories=[Category(c["id"], c["name"], c.get("supercategory", "")) for c in coco["categories"]],
        annotation_files=[
            AnnotationFile(annotations.name, hashlib.sha256(annotations.read_bytes()).hexdigest())
        ],
        rejects=[],
        reject_counts={},
    )
    write_manifest(manifest, split_dir / "manifest.json")
    return split_dir / "manifest.json"


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded dataset at test size (96-128 px images), sharded 8 images per shard without Ray.

    Keys ``pretrain/train`` (32 images, 4 shards), ``pretrain/val`` (8), ``finetune/train`` (16, 2 shards),
    ``finetune/val`` (8): manifest paths. The two label spaces differ (class remap by name). Read-only.
    """
    from pipeline.data.config import DemoDataConfig
    from pipeline.data.demo_dataset import make_demo_data

    root = tmp_path_factory.mktemp("demo_shards")
    demo = make_demo_data(
        DemoDataConfig(
            out=root / "coco",
            pretrain_train=32,
            pretrain_val=8,
            finetune_train=16,
            finetune_val=8,
            min_size=96,
            max_size=128,
            max_objects=4,
        )
    )
    shards = root / "shards"
    return {
        key: write_coco_shards(split.images, split.annotations, shards / key.replace("/", "_") / "split", 8)
        for key, split in demo.splits.items()
    }


# ---- training stage runs (tests/test_train_*.py) ---------------------------------------------------------

TRAIN_TEST_OVERRIDES = [
    "model=debug",
    "train=debug",
    "train.num_workers=0",
    "train.aug_scale=0.2",
    "train.epoch_samples=8",
    "train.log_every=1",
    "train.checkpoint_every=2",
    "eval.short_side=96",
    "eval.max_size=160",
    "eval.num_workers=0",
    "eval.draw_images=0",
]
"""Every test run: the debug model on 58-160 px images, 4 batches per rank per epoch (2 ranks), a progress
record per step and a checkpoint every 2 steps."""


def train_env() -> dict[str, str]:
    """The environment of a training subprocess (two ranks on two cores, no telemetry)."""
    import os

    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
    }


def train_command(stage: str, overrides: list[str], nproc: int = 1) -> list[str]:
    """``python -m pipeline <stage> ...``, under torchrun for ``nproc > 1``."""
    from pipeline.launch import free_port

    if nproc == 1:
        launcher = [sys.executable, "-m", "pipeline"]
    else:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
            "-m",
            "pipeline",
        ]
    return [*launcher, stage, *TRAIN_TEST_OVERRIDES, *overrides]


def run_train(stage: str, overrides: list[str], cwd: Path, nproc: int = 1, timeout: float = 400):
    """Run a training stage to its end; returns the CompletedProcess (stdout and stderr as text)."""
    import subprocess

    return subprocess.run(
        train_command(stage, overrides, nproc),
        cwd=cwd,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def reference_overrides(shards: dict[str, Path], out: Path) -> list[str]:
    """The reference pretraining run: 6 steps (epoch 0 ends at step 4: checkpoint + evaluation), EMA on."""
    return [
        f"data={shards['pretrain/train']}",
        f"val_data={shards['pretrain/val']}",
        f"out={out}",
        "train.max_steps=6",
        "train.ema.enabled=true",
    ]


def logged_losses(out: Path) -> dict[int, float]:
    """Step -> total loss from a run's ``metrics.jsonl``."""
    import json

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in records}


@pytest.fixture(scope="session")
def reference_run(demo_shards: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank ZeRO-2 pretraining run (torchrun) of the reference config; its ``out``.

    Read-only: tests that continue it work on a copy.
    """
    root = tmp_path_factory.mktemp("train_reference")
    out = root / "out"
    result = run_train("pretrain", reference_overrides(demo_shards, out), cwd=root, nproc=2)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out
