"""Peak driver memory of the shard stage's indexing on an Objects365-size annotation file.

    python benchmarks/o365_scale_rss.py [--images 1700000 --boxes 25000000] [--dir /tmp/o365_rss] [--keep]

Writes a synthetic ``zhiyuan_objv2_train.json`` (and a 5-image val file) in the Objects365 layout with
``--images`` images and ``--boxes`` boxes (several GB), then runs the stage's driver-side work on it in a
child process (both passes over the JSON, partition, spilling the annotations to per-shard files: all
that the driver does before shard tasks start) and reports the child's peak RSS and wall time. The image
files do not exist, so no shard is written. The files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np


def write_annotations(path: Path, images: int, boxes: int, seed: int = 0) -> None:
    """A COCO-style Objects365 JSON of ``images`` images and ``boxes`` boxes, written as a stream."""
    rng = np.random.default_rng(seed)
    per_image = rng.multinomial(boxes, np.full(images, 1.0 / images))
    with open(path, "w", encoding="utf-8", buffering=1 << 22) as out:
        out.write('{"images": [')
        for i in range(images):
            version, patch = (1, i % 16) if i % 3 else (2, 16 + i % 35)
            out.write(
                f'{"," if i else ""}{{"height": 683, "id": {i + 1}, "license": 5, "width": 1024, '
                f'"file_name": "images/v{version}/patch{patch}/objects365_v{version}_{i + 1:08d}.jpg", '
                '"url": ""}'
            )
        out.write('], "annotations": [')
        ann_id = 0
        xy = rng.uniform(0, 600, size=(1 << 20, 2)).round(4)
        wh = rng.uniform(1, 400, size=(1 << 20, 2)).round(4)
        cats = rng.integers(1, 366, size=1 << 20)
        for i, count in enumerate(per_image.tolist()):
            for _ in range(count):
                k = ann_id & ((1 << 20) - 1)
                x, y, w, h = xy[k, 0], xy[k, 1], wh[k, 0], wh[k, 1]
                out.write(
                    f'{"," if ann_id else ""}{{"id": {ann_id + 1}, "iscrowd": 0, "isfake": 0, '
                    f'"area": {w * h:.4f}, "isreflected": 0, "bbox": [{x}, {y}, {w}, {h}], '
                    f'"image_id": {i + 1}, "category_id": {cats[k]}}}'
                )
                ann_id += 1
        out.write('], "categories": [')
        out.write(",".join(f'{{"name": "class{c}", "id": {c}}}' for c in range(1, 366)))
        out.write("]}")


def _index(root: str, images_per_shard: int) -> None:
    from pipeline.data.coco_source import resolve_sources
    from pipeline.data.config import DatasetConfig, ShardConfig, ShardStageConfig
    from pipeline.data.partition import build_plan

    cfg = ShardStageConfig(
        out=Path(root) / "out",
        dataset=DatasetConfig(kind="o365", root=Path(root), o365_val_holdout=5),
        shard=ShardConfig(images_per_shard=images_per_shard),
    )
    sources = resolve_sources(cfg.dataset)
    samples: list[tuple[float, int]] = []
    start = time.perf_counter()

    def sample_rss() -> None:  # the resident set every 0.5 s, to see which phase peaks
        page = os.sysconf("SC_PAGE_SIZE")
        while True:
            with open("/proc/self/statm") as statm:
                samples.append((time.perf_counter() - start, int(statm.read().split()[1]) * page))
            time.sleep(0.5)

    threading.Thread(target=sample_rss, daemon=True).start()
    plan = build_plan(cfg, sources)
    at, peak = max(samples, key=lambda sample: sample[1])
    print(
        f"sampled peak RSS {peak / 2**20:,.0f} MiB at {at:.0f} s of {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    print(
        f"plan: {len(plan.ids):,} images in {plan.num_shards} shards, {plan.annotations_listed:,} annotations"
        " "
        f"spilled, {len(plan.index_rejects)} index rejects",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_700_000)
    parser.add_argument("--boxes", type=int, default=25_000_000)
    parser.add_argument("--images-per-shard", type=int, default=3000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/o365_rss"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    train = args.dir / "zhiyuan_objv2_train.json"
    if not train.exists():
        start = time.perf_counter()
        write_annotations(train.with_suffix(".tmp"), args.images, args.boxes)
        train.with_suffix(".tmp").rename(train)
        print(
            f"wrote {train} ({train.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.0f} s"
        )
    write_annotations(args.dir / "zhiyuan_objv2_val.json", 5, 20, seed=1)
    start = time.perf_counter()
    child = multiprocessing.get_context("spawn").Process(
        target=_index, args=(str(args.dir), args.images_per_shard)
    )
    child.start()
    child.join()
    elapsed = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"{args.images:,} images, {args.boxes:,} boxes, JSON {train.stat().st_size / 2**30:.2f} GiB: "
        "driver indexing "
        f"peak RSS {peak_mib:,.0f} MiB, {elapsed:.0f} s (exit code {child.exitcode})"
    )
    if not args.keep:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
