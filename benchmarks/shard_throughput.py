"""Sharding throughput against ``tar -cf`` of the same files, and its scaling from 1 to 2 Ray workers.

    python benchmarks/shard_throughput.py [--small 1024 --large 6144] [--images-per-shard 512]
        [--checks structure draft] [--repeats 3]

coco128 (../shared) is replicated under new image ids (copies: tar stores hard links as links) to
``--large`` images in benchmarks/out/. Each configuration shards ``--small`` and ``--large`` images;
throughput is marginal, (large - small) / (t_large - t_small), with medians over ``--repeats`` runs;
``tar -cf`` is timed again beside each configuration, interleaved with it, and each ratio uses the tar of
the same minutes (this VM's speed drifts by a fifth over minutes).
Each repeat of a configuration runs in a Ray instance started for it and warmed by a first run, as on a
cluster: Ray's start-up and the workers' imports are outside every timed run (they were the noise of an
earlier version that timed each run with its own Ray). 1 and 2 workers alternate, repeat by repeat, and
each pair's scaling is printed too: on this VM the 2-worker runs vary more than the drift between them.
Files are read once first, so both tar and the stage read from the page cache. The stage fsyncs every
shard (tar does not): "tar + sync" is the same floor made durable. After every timed run (outside its
time) the output is deleted and the file system synced, so no run writes back another's dirty pages.
512 images per shard (about 84 MiB, a third of the stage's default ``target_shard_mb``; 2 and 12 shards,
so both configurations get whole rounds); smaller shards add Ray's few ms per task to every image.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ray

from pipeline.data.config import DatasetConfig, ShardConfig, ShardStageConfig
from pipeline.data.shard import run_shard

ROOT = Path(__file__).resolve().parents[1]
COCO128 = ROOT.parent / "shared" / "data" / "coco128"
Data = tuple[Path, Path, int]
"""A replicated set: image folder, COCO JSON, image bytes."""


def replicate(count: int, work: Path) -> Data:
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


def time_tar(images_dir: Path, out: Path, sync: bool) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``tar -cf`` (then ``sync``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(images_dir), "."], check=True)
    if sync:
        subprocess.run(["sync", "-f", str(out)], check=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.unlink()
    os.sync()
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def time_shard(
    images_dir: Path, annotations: Path, out: Path, cpus: int, per_shard: int, check: str
) -> tuple[float, float, float]:
    """Wall seconds of the whole stage, CPU seconds of its shard tasks, seconds of its write phase."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = ShardStageConfig(
        out=out,
        dataset=DatasetConfig(name="bench", images=images_dir, annotations=annotations),
        shard=ShardConfig(images_per_shard=per_shard, num_cpus=cpus, decode_check=check),
    )
    start = time.perf_counter()
    summary = run_shard(cfg)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return elapsed, summary.task_cpu_seconds, summary.write_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1024)
    parser.add_argument("--large", type=int, default=6144)
    parser.add_argument("--images-per-shard", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checks", nargs="+", default=["structure", "draft"], help="decode_check values")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "shard_throughput")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args.work.mkdir(parents=True, exist_ok=True)
    small = replicate(args.small, args.work)
    large = replicate(args.large, args.work)
    extra_images = args.large - args.small
    extra_mib = (large[2] - small[2]) / 2**20
    rows: list[tuple[str, float, float, float, float, float, float]] = []

    def record(
        name: str, small_run: tuple[float, ...], large_run: tuple[float, ...]
    ) -> tuple[float, float, float]:
        """Marginal images/s, marginal CPU ms/image, and images/s of the large run's write phase."""
        rate = extra_images / (large_run[0] - small_run[0])
        cpu_ms = (large_run[1] - small_run[1]) / extra_images * 1000
        phase = args.large / large_run[2] if len(large_run) > 2 else float("nan")
        rows.append((name, small_run[0], large_run[0], rate, rate * extra_mib / extra_images, cpu_ms, phase))
        return rate, cpu_ms, phase

    def medians(runs: list[tuple[float, ...]]) -> tuple[float, ...]:
        """Field-by-field medians of repeated runs."""
        return tuple(statistics.median(run[f] for run in runs) for f in range(len(runs[0])))

    def tar(data: Data, sync: bool = False) -> tuple[float, ...]:
        return time_tar(data[0], args.work / "t.tar", sync)

    syncs = [(tar(small, True), tar(large, True)) for _ in range(args.repeats)]
    record("tar -cf + sync", medians([p[0] for p in syncs]), medians([p[1] for p in syncs]))
    results = {}
    paired: dict[str, list[tuple[float, float]]] = {}
    out = args.work / "shards"
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}}
    for check in args.checks:
        runs: dict[int, list[tuple[tuple[float, ...], ...]]] = {1: [], 2: []}
        # The two configurations alternate, each repeat in a Ray started and warmed for it, and tar runs
        # beside each: this VM's speed drifts by 20% over minutes, so each pair shares its minutes.
        for _ in range(args.repeats):
            for cpus in (1, 2):

                def shard(data: Data, cpus: int = cpus, check: str = check) -> tuple[float, ...]:
                    return time_shard(data[0], data[1], out, cpus, args.images_per_shard, check)

                ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=env)
                try:
                    shard(small)  # warm-up: the workers start and import the stage
                    runs[cpus].append((tar(small), tar(large), shard(small), shard(large)))
                finally:
                    ray.shutdown()
        for cpus in (1, 2):
            window = f"{cpus} worker(s), {check}"
            config_runs = runs[cpus]
            tar_result = record(
                f"tar -cf (beside {window})", *(medians([r[k] for r in config_runs]) for k in (0, 1))
            )
            stage = record(f"shard stage, {window}", *(medians([r[k] for r in config_runs]) for k in (2, 3)))
            results[(cpus, check)] = (stage, tar_result)

        def rate(run: tuple[tuple[float, ...], ...], small_at: int) -> float:
            return extra_images / (run[small_at + 1][0] - run[small_at][0])

        paired[check] = [
            (rate(two, 2) / rate(one, 2), rate(two, 2) / rate(two, 0)) for one, two in zip(runs[1], runs[2])
        ]
    load = os.getloadavg()
    print(
        f"\n{args.small} -> {args.large} images ({extra_mib:.0f} MiB more), {args.images_per_shard} "
        f"images/shard, {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(
        f"{'method':<46} {'t_small s':>9} {'t_large s':>9} {'images/s':>9} {'MiB/s':>7} {'CPU ms/img':>10} "
        f"{'write phase img/s':>17}"
    )
    for name, t_small, t_large, rate, mib, cpu_ms, phase in rows:
        print(
            f"{name:<46} {t_small:>9.2f} {t_large:>9.2f} {rate:>9.0f} {mib:>7.1f} {cpu_ms:>10.2f} "
            f"{phase:>17.0f}"
        )
    print(
        f"images/s, MiB/s: marginal (small -> large), medians of {args.repeats} runs. CPU ms/img: tar's own; "
        "the stage's shard tasks (Ray and the driver excluded). Write phase: the large run, first task "
        "submitted to last done."
    )
    for check in args.checks:
        (two, two_tar), (one, one_tar) = results[(2, check)], results[(1, check)]
        print(
            f"decode_check={check}: 2 workers / tar (same minutes) = {two[0] / two_tar[0]:.2f} marginal, "
            f"{two[2] / two_tar[0]:.2f} write phase, {2 * two_tar[1] / two[1]:.2f} by CPU (2 cores vs "
            f"tar's 1); 1 -> 2 workers: {two[0] / one[0]:.2f}x marginal, {two[2] / one[2]:.2f}x write phase "
            f"({two[0] / two_tar[0] / (one[0] / one_tar[0]):.2f}x against tar in the same minutes)"
        )
        scaling = sorted(pair[0] for pair in paired[check])
        against_tar = sorted(pair[1] for pair in paired[check])
        print(
            f"  per repeat (1 and 2 workers back to back): 1 -> 2 workers {statistics.median(scaling):.2f}x "
            f"median ({', '.join(f'{x:.2f}' for x in scaling)}); 2 workers / tar "
            f"{statistics.median(against_tar):.2f} median ({', '.join(f'{x:.2f}' for x in against_tar)})"
        )


if __name__ == "__main__":
    main()
