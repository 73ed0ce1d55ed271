"""Kill -9 the shard job mid-way and rerun it: only missing shards are written, the same manifest bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.data.config import DatasetConfig, ShardConfig, ShardStageConfig
from pipeline.data.manifest import load_manifest
from pipeline.data.shard import run_shard
from pipeline.data.stream import iter_shard

REPLICAS = 10


def _replicated_sample(coco_sample: Path, root: Path) -> tuple[Path, Path]:
    """The sample's images REPLICAS times under new ids (hard links), with their annotations."""
    source = json.loads((coco_sample / "instances.json").read_text())
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for r in range(REPLICAS):
        for image in source["images"]:
            new_id = (r + 1) * 1_000_000 + image["id"]
            name = f"{r:02d}_{image['file_name']}"
            os.link(coco_sample / "images" / image["file_name"], images_dir / name)
            images.append({**image, "id": new_id, "file_name": name})
        for ann in source["annotations"]:
            annotations.append(
                {
                    **ann,
                    "id": (r + 1) * 10_000_000 + ann["id"],
                    "image_id": (r + 1) * 1_000_000 + ann["image_id"],
                }
            )
    path = root / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": source["categories"]})
    )
    return images_dir, path


def _cfg(images: Path, annotations: Path, out: Path) -> ShardStageConfig:
    return ShardStageConfig(
        out=out,
        dataset=DatasetConfig(name="rep", images=images, annotations=annotations),
        shard=ShardConfig(images_per_shard=1),
    )


def test_kill_9_mid_way_then_rerun(ray_session, coco_sample: Path, tmp_path: Path) -> None:
    images, annotations = _replicated_sample(coco_sample, tmp_path / "src")
    total = 12 * REPLICAS
    out = tmp_path / "killed"
    split = out / "rep" / "train"
    script = (
        "from pathlib import Path\n"
        "from pipeline.data.config import DatasetConfig, ShardConfig, ShardStageConfig\n"
        "from pipeline.data.shard import run_shard\n"
        f"run_shard(ShardStageConfig(out=Path({str(out)!r}), dataset=DatasetConfig(name='rep', "
        f"images=Path({str(images)!r}), annotations=Path({str(annotations)!r})), "
        "shard=ShardConfig(images_per_shard=1, num_cpus=1, max_in_flight=1)))\n"
    )
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path),
    }
    job = subprocess.Popen(
        [sys.executable, "-c", script],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and job.poll() is None:
            if split.is_dir() and len(list(split.glob("rep-train-*.tar"))) >= 6:
                break
            time.sleep(0.01)
        assert job.poll() is None, "the shard job ended before it could be killed"
        os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    time.sleep(0.5)
    written_before = {p.name: p.stat().st_mtime_ns for p in split.glob("rep-train-*.tar")}
    assert not (split / "manifest.json").exists()
    assert 6 <= len(written_before) < total

    resumed = run_shard(_cfg(images, annotations, out))
    assert not resumed.already_complete
    assert 0 < resumed.shards_written <= total - len(written_before) + 1  # the one in flight may be redone
    redone = [name for name, mtime in written_before.items() if (split / name).stat().st_mtime_ns != mtime]
    assert len(redone) <= 1

    reference = run_shard(_cfg(images, annotations, tmp_path / "clean"))
    assert resumed.manifest_path.read_bytes() == reference.manifest_path.read_bytes()
    assert not list(split.glob(".*")), "temporary files or staging left behind"

    keys = [
        raw["__key__"]
        for url in load_manifest(resumed.manifest_path).shard_locations()
        for raw in iter_shard(url)
    ]
    expected = sorted(
        f"{(r + 1) * 1_000_000 + i:012d}"
        for r in range(REPLICAS)
        for i in (30, 92, 143, 149, 326, 349, 359, 472, 536, 562, 590, 643)
    )
    assert sorted(keys) == expected and len(set(keys)) == total
