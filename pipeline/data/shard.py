"""The shard stage: COCO-format datasets into WebDataset tars, one Ray task per shard.

``run_shard`` (``python -m pipeline shard``) builds or reuses the plan (:mod:`pipeline.data.partition`),
runs a Ray task for every shard that is not complete yet, then writes ``manifest.json`` atomically.
Each task writes its tar under a temporary name, fsyncs it, renames it into place, then records its
counts and sha256 beside the plan; a shard counts as done only when both exist and agree on the size.
Tars are deterministic (members in image-id order, fixed mtime/owner/mode), so a rerun after ``kill -9``
writes only the missing shards and the same manifest bytes. ``verify_shards`` re-reads every shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from pipeline.config import inputs_accepted
from pipeline.data import rejects as R
from pipeline.data.coco_source import (
    AnnotationFileError,
    SourceFile,
    check_source_paths,
    resolve_sources,
    sha256_file,
)
from pipeline.data.config import ShardStageConfig
from pipeline.data.manifest import (
    KEY_DIGITS,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    load_manifest,
    write_manifest,
)
from pipeline.data.partition import (
    STAGING_PREFIX,
    Plan,
    build_plan,
    has_staged_plan,
    load_plan,
    partition_settings,
    plan_fingerprint,
    staging_dir,
)
from pipeline.data.rejects import RejectSummary
from pipeline.data.shard_writer import ShardResult, ShardTask, write_shard


class ShardStageError(RuntimeError):
    """The output folder holds a finished split of different input or settings."""


@dataclass(frozen=True)
class ShardSummary:
    """What ``run_shard`` did: the manifest it wrote (or found), counts and throughput of this run."""

    manifest_path: Path
    num_shards: int
    shards_written: int
    num_samples: int
    num_annotations: int
    rejects: RejectSummary
    seconds: float
    images_per_second: float
    mib_per_second: float
    already_complete: bool
    task_cpu_seconds: float = 0.0
    """CPU time the shard tasks of this run spent (Ray and driver overhead excluded)."""
    write_seconds: float = 0.0
    """Wall time from the first shard task's submission to the last one's end (no Ray start-up)."""


_write_shard_remote = ray.remote(num_cpus=1, max_retries=2)(write_shard)
"""Ray tasks are retried on worker death; a retry rewrites the same bytes."""


def _shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def _record_path(plan: Plan, name: str) -> Path:
    return plan.directory / "done" / f"{name}.json"


def _finished(plan: Plan, split_dir: Path, name: str) -> ShardResult | None:
    """The shard's record when the shard is complete (record present, tar present with its size)."""
    try:
        result = ShardResult.from_json(_record_path(plan, name).read_text(encoding="utf-8"))
        if (split_dir / name).stat().st_size == result.entry.bytes:
            return result
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _task(cfg: ShardStageConfig, plan: Plan, index: int, name: str) -> ShardTask:
    lo, hi = int(plan.shard_starts[index]), int(plan.shard_starts[index + 1])
    file_names = plan.shard_names(index)
    roots = plan.image_roots
    paths = [os.path.join(roots[s], f) for s, f in zip(plan.sources[lo:hi].tolist(), file_names)]
    return ShardTask(
        str(cfg.split_dir),
        name,
        plan.ids[lo:hi],
        plan.widths[lo:hi],
        plan.heights[lo:hi],
        paths,
        file_names,
        str(plan.annotation_file(index)),
        str(_record_path(plan, name)),
        frozenset(c.id for c in plan.categories),
        cfg.dataset.kind == "o365",
        cfg.shard.decode_check,
    )


class _Progress:
    """Periodic progress lines: shards done / total, images/s, MiB/s, ETA."""

    def __init__(self, total: int, pending: int) -> None:
        self.total, self.pending = total, pending
        self.done = total - pending
        self.images = self.bytes = 0
        self.start = self.last = time.monotonic()

    def update(self, result: ShardResult) -> None:
        self.done += 1
        self.images += result.entry.num_samples
        self.bytes += result.image_bytes
        now = time.monotonic()
        if now - self.last >= 5.0 or self.done == self.total:
            self.last = now
            elapsed = max(now - self.start, 1e-9)
            finished_here = self.done - (self.total - self.pending)
            eta = elapsed / finished_here * (self.total - self.done)
            print(
                f"[shard] {self.done}/{self.total} shards, {self.images / elapsed:,.0f} images/s, "
                f"{self.bytes / elapsed / 2**20:,.1f} MiB/s, ETA {eta:,.0f} s",
                flush=True,
            )


def _connect(cfg: ShardStageConfig) -> bool:
    """Connect to Ray (the given cluster or a new local one); True when this call started it."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Workers import this package: give a local Ray the driver's import path (a cluster has it installed).
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}}
    if cfg.shard.ray_address:
        ray.init(address=cfg.shard.ray_address, log_to_driver=True)
    else:
        # address='local': a new local instance even when a `ray start` cluster runs on this machine.
        ray.init(
            address="local",
            num_cpus=cfg.shard.num_cpus,
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
        )
    return True


def _run_tasks(
    cfg: ShardStageConfig, plan: Plan, pending: list[tuple[int, str]], progress: _Progress
) -> tuple[list[ShardResult], float]:
    """Run the pending shards' tasks; returns their results and the seconds from first submission to last."""
    started = _connect(cfg)
    progress.start = progress.last = time.monotonic()  # rates and ETA without Ray's start-up
    try:
        limit = cfg.shard.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        queue = list(pending)
        in_flight: list[Any] = []
        results: list[ShardResult] = []
        while queue or in_flight:
            while queue and len(in_flight) < limit:
                index, name = queue.pop(0)
                in_flight.append(_write_shard_remote.remote(_task(cfg, plan, index, name)))
            ready, in_flight = ray.wait(in_flight, num_returns=1)
            for result in ray.get(ready):
                results.append(result)
                progress.update(result)
        return results, time.monotonic() - progress.start
    finally:
        if started:
            ray.shutdown()


def _finished_manifest(manifest_path: Path) -> Manifest | None:
    if not manifest_path.exists():
        return None
    try:
        return load_manifest(manifest_path)
    except ManifestError:
        return None  # a corrupt manifest is rewritten from the plan and the shards


def _made_otherwise(manifest: Manifest, settings: dict[str, Any], sources: list[SourceFile]) -> bool:
    """Whether ``manifest`` was made with other settings or from other annotation files. Other settings
    are seen without hashing the annotation files (GBs for Objects365)."""
    return manifest.config != settings or [a.sha256 for a in manifest.annotation_files] != [
        sha256_file(source.annotations) for source in sources
    ]


def superseded_split(cfg: ShardStageConfig) -> bool:
    """Whether ``cfg``'s split directory holds a finished split made from other input or settings, which
    ``run_shard`` refuses to write over (``python -m pipeline run`` moves it aside first). False while an
    annotation file is missing: the stage itself then names it."""
    manifest = _finished_manifest(cfg.split_dir / MANIFEST_NAME)
    sources = resolve_sources(cfg.dataset)
    if manifest is None or not all(source.annotations.is_file() for source in sources):
        return False
    return _made_otherwise(manifest, partition_settings(cfg), sources)


IMAGE_PROBES = 64
"""How many listed images (evenly spread over the split) are looked for before the shard tasks start."""


def _check_image_root(cfg: ShardStageConfig, plan: Plan) -> None:
    """Fail before any shard task when none of :data:`IMAGE_PROBES` listed images, evenly spread over the
    split (all of them in a smaller split), exists: the image root is wrong, and every image would be a
    ``missing_image`` reject. Some missing ones are left to the tasks and the reject summary.

    Raises:
        AnnotationFileError: naming the image root, an image path looked for, and the keys to fix.
    """
    count = len(plan.ids)
    if count == 0:
        return
    probes = sorted({int(i) for i in np.linspace(0, count - 1, min(IMAGE_PROBES, count))})
    paths = [plan.image_path(i) for i in probes]
    if any(os.path.isfile(path) for path in paths):
        return
    keys = "dataset.images" if cfg.dataset.kind == "coco_format" else "dataset.root (or dataset.images)"
    looked = "" if len(probes) == count else f" (looked for {len(probes)}, spread over the {count} listed)"
    roots = ", ".join(sorted(set(plan.image_roots)))
    raise AnnotationFileError(
        f"0 of {len(probes)} listed images found under {roots}{looked}; e.g. "
        f"{paths[0]} does not exist: is {keys} right? It must be the folder the annotation file's "
        "file_name values are relative to"
    )


def _summary_of(plan: Plan, results: list[ShardResult]) -> RejectSummary:
    reasons = [r.reason for r in plan.index_rejects] + [r.reason for res in results for r in res.rejects]
    fixes: Counter[str] = Counter()
    for res in results:
        fixes.update(res.fixes)
    return RejectSummary(
        plan.images_listed, plan.annotations_listed, R.count_reasons(reasons), dict(sorted(fixes.items()))
    )


def run_shard(cfg: ShardStageConfig) -> ShardSummary:
    """Shard one split (see the module docstring); returns what was done.

    Raises:
        AnnotationFileError: a missing annotation file or image root, or JSON that is not COCO-style.
        RejectFractionExceeded: more rejects than ``shard.max_reject_fraction``; no manifest is written.
        ShardStageError: ``out`` already holds this split made from other input or settings.
    """
    start = time.monotonic()
    split_dir = cfg.split_dir
    manifest_path = split_dir / MANIFEST_NAME
    sources = resolve_sources(cfg.dataset)
    check_source_paths(sources)
    split_dir.mkdir(parents=True, exist_ok=True)
    settings = partition_settings(cfg)
    existing = _finished_manifest(manifest_path)
    if existing is not None:
        if _made_otherwise(existing, settings, sources):
            raise ShardStageError(
                f"{manifest_path} already describes a finished split made from other input or settings "
                f"({existing.config}); write to another out= or remove {split_dir}"
            )
        print(
            f"[shard] {manifest_path} is complete ({len(existing.shards)} shards, {existing.num_samples} "
            "samples) for this input and settings: nothing to do",
            flush=True,
        )
        summary = RejectSummary(0, 0, existing.reject_counts, {})
        return ShardSummary(
            manifest_path,
            len(existing.shards),
            0,
            existing.num_samples,
            existing.num_annotations,
            summary,
            time.monotonic() - start,
            0.0,
            0.0,
            True,
        )
    plan = None
    if has_staged_plan(split_dir):
        # An interrupted run's plan is found by the annotation files' hashes; a new split takes them
        # from the indexing pass instead (Objects365's 4 GiB are then read once, not twice).
        fingerprint = plan_fingerprint(cfg, [sha256_file(source.annotations) for source in sources])
        plan = load_plan(staging_dir(split_dir, fingerprint))
        if plan is not None and plan.fingerprint != fingerprint:
            plan = None
    if plan is None:
        print(f"[shard] indexing {', '.join(str(s.annotations) for s in sources)}", flush=True)
        plan = build_plan(cfg, sources)
    (plan.directory / "done").mkdir(exist_ok=True)
    dataset, split = cfg.dataset.dataset_name, cfg.dataset.split
    names = [_shard_name(dataset, split, i) for i in range(plan.num_shards)]
    done: dict[str, ShardResult] = {}
    pending: list[tuple[int, str]] = []
    for index, name in enumerate(names):
        result = _finished(plan, split_dir, name)
        if result is None:
            pending.append((index, name))
        else:
            done[name] = result
    print(
        f"[shard] {split_dir}: {plan.num_shards} shards of {len(plan.ids)} images, {len(done)} already "
        f"complete, {len(pending)} to write",
        flush=True,
    )
    if pending:
        _check_image_root(cfg, plan)
    inputs_accepted()
    progress = _Progress(plan.num_shards, len(pending))
    written, write_seconds = _run_tasks(cfg, plan, pending, progress) if pending else ([], 0.0)
    for result in written:
        done[result.entry.name] = result
    results = [done[name] for name in names]

    summary = _summary_of(plan, results)
    for line in summary.lines():
        print(f"[shard] {line}", flush=True)
    summary.check(cfg.shard.max_reject_fraction)

    rejects = plan.index_rejects + [r for res in results for r in res.rejects]
    entries = [res.entry for res in results]
    reject_counts = {**summary.counts, **summary.fixes}
    manifest = Manifest(
        SCHEMA_VERSION,
        dataset,
        split,
        cfg.dataset.kind,
        sum(e.num_samples for e in entries),
        sum(e.num_annotations for e in entries),
        entries,
        plan.categories,
        plan.annotation_files,
        rejects,
        reject_counts,
        settings,
    )
    write_manifest(manifest, manifest_path)
    shutil.rmtree(plan.directory, ignore_errors=True)
    for stale in split_dir.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    for tmp in split_dir.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
    elapsed = time.monotonic() - start
    image_bytes = sum(res.image_bytes for res in written)
    written_images = sum(res.entry.num_samples for res in written)
    print(
        f"[shard] wrote {manifest_path}: {manifest.num_samples} samples, "
        f"{manifest.num_annotations} annotations in {len(entries)} shards ({len(pending)} written now) "
        f"in {elapsed:.1f} s",
        flush=True,
    )
    return ShardSummary(
        manifest_path,
        len(entries),
        len(pending),
        manifest.num_samples,
        manifest.num_annotations,
        summary,
        elapsed,
        written_images / elapsed,
        image_bytes / elapsed / 2**20,
        False,
        sum(res.cpu_seconds for res in written),
        write_seconds,
    )


@dataclass
class VerifyReport:
    """What ``verify_shards`` found: ``ok`` when every shard matches the manifest."""

    manifest_path: str
    shards_checked: int
    samples: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(manifest_path: Path | str) -> VerifyReport:
    """Re-read every shard of a local split: size, sha256, sample and annotation counts, keys and members."""
    manifest = load_manifest(manifest_path)
    report = VerifyReport(manifest.location, 0, 0)
    folder = Path(manifest.location).parent
    for entry in manifest.shards:
        path = folder / entry.name
        report.shards_checked += 1
        try:
            data = path.read_bytes()
        except OSError as error:
            report.problems.append(f"{entry.name}: cannot read ({error})")
            continue
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            report.problems.append(f"{entry.name}: size or sha256 differs from the manifest")
            continue
        members: dict[str, set[str]] = defaultdict(set)
        annotations = 0
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar:
                    key, _, extension = member.name.partition(".")
                    members[key].add(extension)
                    if extension == "json":
                        record = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                        annotations += len(record["annotations"])
                        if f"{record['id']:0{KEY_DIGITS}d}" != key:
                            report.problems.append(
                                f"{entry.name}: sample {key} carries image id {record['id']}"
                            )
        except (tarfile.TarError, ValueError, KeyError) as error:
            report.problems.append(f"{entry.name}: unreadable tar or sample ({error})")
            continue
        incomplete = [k for k, exts in members.items() if "json" not in exts or not exts & {"jpg", "png"}]
        if incomplete:
            report.problems.append(f"{entry.name}: samples without an image or json: {incomplete[:5]}")
        if len(members) != entry.num_samples or annotations != entry.num_annotations:
            report.problems.append(
                f"{entry.name}: {len(members)} samples / {annotations} annotations, the "
                f"manifest says {entry.num_samples} / {entry.num_annotations}"
            )
        report.samples += len(members)
    return report


def run(cfg: ShardStageConfig) -> int:
    """CLI entry of ``python -m pipeline shard``: shard a split, or with ``verify=true`` check it.

    Returns the exit code: 0 done, 1 failed (the reason is printed), 3 verification found problems.
    """
    if cfg.verify:
        try:
            report = verify_shards(cfg.split_dir / MANIFEST_NAME)
        except ManifestError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        for problem in report.problems:
            print(f"[verify] {problem}", flush=True)
        print(
            f"[verify] {report.manifest_path}: {report.shards_checked} shards, {report.samples} samples, "
            f"{'OK' if report.ok else f'{len(report.problems)} problems'}",
            flush=True,
        )
        return 0 if report.ok else 3
    try:
        run_shard(cfg)
    except (AnnotationFileError, R.RejectFractionExceeded, ShardStageError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0
