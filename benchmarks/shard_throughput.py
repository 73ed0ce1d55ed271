"""Sharding throughput against ``tar -cf`` of the same files, and its scaling from 1 to 2 Ray workers.

    python benchmarks/shard_throughput.py [--small 1024 --large 4096] [--images-per-shard 128]

coco128 (../shared) is replicated under new image ids (copies: tar stores hard links as links) to
``--large`` images in benchmarks/out/. Each configuration shards ``--small`` and ``--large`` images;
throughput is marginal, (large - small) / (t_large - t_small), so Ray start-up, indexing and the
manifest cancel out. Files are read once first, so both tar and the stage read from the page cache.
The stage fsyncs every shard (tar does not): "tar + sync" is the same floor made durable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from pipeline.data.config import DatasetConfig, ShardConfig, ShardStageConfig
from pipeline.data.shard import run_shard

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"


def replicate(count: int, work: Path) -> tuple[Path, Path, int]:
    """``count`` images (coco128 repeated, copied) and their COCO JSON; returns dir, JSON, bytes."""
    source = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    images_dir = work / f"images_{count}"
    shutil.rmtree(images_dir, ignore_errors=True)
    images_dir.mkdir(parents=True)
    images, annotations, total = [], [], 0
    by_image: dict[int, list] = {}
    for ann in source["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for n in range(count):
        image = source["images"][n % len(source["images"])]
        rep = n // len(source["images"])
        new_id = rep * 10_000_000 + image["id"]
        name = f"{rep:03d}_{image['file_name']}"
        shutil.copyfile(COCO128 / "train2017" / image["file_name"], images_dir / name)
        total += (images_dir / name).stat().st_size
        images.append({**image, "id": new_id, "file_name": name})
        annotations += [
            {**a, "id": rep * 100_000_000 + a["id"], "image_id": new_id}
            for a in by_image.get(image["id"], [])
        ]
    path = work / f"instances_{count}.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": source["categories"]})
    )
    for file in images_dir.iterdir():  # warm the page cache
        file.read_bytes()
    return images_dir, path, total


def time_tar(images_dir: Path, out: Path, sync: bool) -> float:
    start = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(images_dir), "."], check=True)
    if sync:
        subprocess.run(["sync", "-f", str(out)], check=True)
    elapsed = time.perf_counter() - start
    out.unlink()
    return elapsed


def time_shard(
    images_dir: Path, annotations: Path, out: Path, cpus: int, per_shard: int, check: str
) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cfg = ShardStageConfig(
        out=out,
        dataset=DatasetConfig(name="bench", images=images_dir, annotations=annotations),
        shard=ShardConfig(images_per_shard=per_shard, num_cpus=cpus, decode_check=check),
    )
    start = time.perf_counter()
    run_shard(cfg)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1024)
    parser.add_argument("--large", type=int, default=4096)
    parser.add_argument("--images-per-shard", type=int, default=128)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "shard_throughput")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args.work.mkdir(parents=True, exist_ok=True)
    small = replicate(args.small, args.work)
    large = replicate(args.large, args.work)
    extra_images = args.large - args.small
    extra_mib = (large[2] - small[2]) / 2**20
    rows = []

    def record(name: str, t_small: float, t_large: float) -> float:
        rate = extra_images / (t_large - t_small)
        rows.append((name, t_small, t_large, rate, rate * extra_mib / extra_images))
        return rate

    tar = record(
        "tar -cf",
        time_tar(small[0], args.work / "s.tar", False),
        time_tar(large[0], args.work / "l.tar", False),
    )
    record(
        "tar -cf + sync",
        time_tar(small[0], args.work / "s.tar", True),
        time_tar(large[0], args.work / "l.tar", True),
    )
    rates = {}
    for cpus, check in ((1, "draft"), (2, "draft"), (2, "header")):
        out = args.work / "shards"
        rates[(cpus, check)] = record(
            f"shard stage, {cpus} Ray worker(s), decode_check={check}",
            time_shard(small[0], small[1], out, cpus, args.images_per_shard, check),
            time_shard(large[0], large[1], out, cpus, args.images_per_shard, check),
        )
    print(
        f"\n{args.small} -> {args.large} images ({extra_mib:.0f} MiB more), "
        f"{args.images_per_shard} images/shard, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'method':<52} {'t_small s':>9} {'t_large s':>9} {'images/s':>9} {'MiB/s':>7}")
    for name, t_small, t_large, rate, mib in rows:
        print(f"{name:<52} {t_small:>9.2f} {t_large:>9.2f} {rate:>9.0f} {mib:>7.1f}")
    print(
        f"\nshard stage (2 workers, draft) / tar: {rates[(2, 'draft')] / tar:.2f}; "
        f"scaling 1 -> 2 workers (draft): {rates[(2, 'draft')] / rates[(1, 'draft')]:.2f}x"
    )


if __name__ == "__main__":
    main()
