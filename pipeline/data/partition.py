"""The shard plan: which images go in which shard, and each shard's annotations spilled to its own file.

Built once per input (annotation files' sha256 + partition settings = the plan's fingerprint) in a
staging folder beside the output, renamed into place when complete, and reused by every rerun, so a
resumed job writes exactly the shards the first run would have. Memory: images are numpy columns;
annotations are copied unparsed to a spill file in the one pass over the JSON, then routed
``shard.annotation_chunk`` lines at a time to ``ann/<shard>.jsonl``.

Partition: the split's images sorted by id, cut every ``images_per_shard`` images, or else greedily at
``target_shard_mb`` of image bytes (a shard closes before the image that would pass the target).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import rejects as R
from pipeline.data.coco_source import (
    MISSING_ID,
    AnnotationFileError,
    ImageColumns,
    SourceFile,
    safe_file_names,
    scan_coco,
)
from pipeline.data.config import ShardStageConfig
from pipeline.data.manifest import AnnotationFile, Category, Reject

PLAN_VERSION = 3
STAGING_PREFIX = ".staging-"


@dataclass
class Plan:
    """A split's images in shard order and where each shard's annotations are.

    ``ids``, ``widths``, ``heights``, ``sources`` ``(n,)``: the kept images sorted by id (``sources``
    indexes ``image_roots``); file names as a blob cut at ``name_offsets (n + 1,)``; shard ``s`` holds
    images ``shard_starts[s]:shard_starts[s + 1]`` and its annotations are in ``annotation_file(s)``.
    """

    directory: Path
    fingerprint: str
    ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    sources: np.ndarray
    name_offsets: np.ndarray
    names: bytes | bytearray
    shard_starts: np.ndarray
    image_roots: list[str]
    categories: list[Category]
    annotation_files: list[AnnotationFile]
    index_rejects: list[Reject]
    images_listed: int
    annotations_listed: int

    @property
    def num_shards(self) -> int:
        return len(self.shard_starts) - 1

    def annotation_file(self, shard: int) -> Path:
        """The JSON-lines file of shard ``shard``'s annotations (absent when it has none)."""
        return self.directory / "ann" / f"{shard:06d}.jsonl"

    def file_name(self, i: int) -> str:
        """Image ``i``'s file name, relative to its image root."""
        return self.names[self.name_offsets[i] : self.name_offsets[i + 1]].decode("utf-8")

    def image_path(self, i: int) -> str:
        """Where image ``i`` is read from: its image root joined with its file name."""
        return os.path.join(self.image_roots[int(self.sources[i])], self.file_name(i))

    def shard_names(self, shard: int) -> list[str]:
        """The file names of shard ``shard``'s images."""
        return [self.file_name(i) for i in range(self.shard_starts[shard], self.shard_starts[shard + 1])]


def plan_fingerprint(cfg: ShardStageConfig, annotation_sha256: list[str]) -> str:
    """What determines the shards' bytes: input hashes and partition/check settings."""
    return hashlib.sha256(
        json.dumps(
            {"version": PLAN_VERSION, "settings": partition_settings(cfg), "annotations": annotation_sha256},
            sort_keys=True,
        ).encode()
    ).hexdigest()


def partition_settings(cfg: ShardStageConfig) -> dict[str, Any]:
    """The settings recorded in the manifest's ``config`` (a rerun with other values is a new output)."""
    data = cfg.dataset
    return {
        "kind": data.kind,
        "dataset": data.dataset_name,
        "split": data.split,
        "o365_val_holdout": data.o365_val_holdout if data.kind == "o365" else None,
        "images_per_shard": cfg.shard.images_per_shard,
        "target_shard_mb": None if cfg.shard.images_per_shard else cfg.shard.target_shard_mb,
        "decode_check": cfg.shard.decode_check,
    }


def staging_dir(split_dir: Path, fingerprint: str) -> Path:
    """Where the plan of this fingerprint lives while the split is being written."""
    return split_dir / f"{STAGING_PREFIX}{fingerprint[:16]}"


def _select(columns: ImageColumns, source: SourceFile) -> tuple[np.ndarray, list[Reject]]:
    """Positions (file order) of the images this source contributes, and the rejects of the other
    listings in this split's id range: repeats of its ids and unsafe file names. Together they are every
    listing the split takes from the source."""
    order = np.argsort(columns.ids, kind="stable")
    sorted_ids = columns.ids[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    unique = order[first]
    keep_hi = len(unique) if source.keep_lowest is None else source.keep_lowest
    chosen = unique[source.skip_lowest : keep_hi]
    # A repeat belongs to the split that takes its id (Objects365's val file feeds two splits).
    repeats = order[~first]
    repeats = repeats[np.isin(columns.ids[repeats], columns.ids[chosen])]
    rejected = [
        Reject(
            int(columns.ids[i]),
            R.DUPLICATE_IMAGE_ID,
            None,
            f"image id listed again in {source.annotations.name}",
        )
        for i in repeats
    ]
    safe = safe_file_names(columns, chosen)
    rejected += [
        Reject(
            int(columns.ids[i]),
            R.UNSAFE_FILE_NAME,
            None,
            f"file_name {columns.file_name(i)!r} would leave the image root",
        )
        for i in chosen[~safe]
    ]
    return chosen[safe], rejected


def _file_sizes(roots: list[str], sources: np.ndarray, names: bytes, offsets: np.ndarray) -> np.ndarray:
    """Each image's size in bytes (0 when missing: it becomes a reject when its shard is written).

    Stats run on 16 threads (network file systems answer them slowly one by one), 65,536 paths at a time.
    """

    def size(path: str) -> int:
        try:
            return os.stat(path).st_size
        except OSError:
            return 0

    sizes = np.zeros(len(sources), dtype=np.int64)
    with ThreadPoolExecutor(max_workers=16) as pool:
        for lo in range(0, len(sources), 1 << 16):
            hi = min(lo + (1 << 16), len(sources))
            paths = [
                os.path.join(roots[s], names[offsets[i] : offsets[i + 1]].decode("utf-8"))
                for i, s in zip(range(lo, hi), sources[lo:hi].tolist())
            ]
            sizes[lo:hi] = list(pool.map(size, paths, chunksize=256))
    return sizes


def _cut(sizes: np.ndarray | None, count: int, images_per_shard: int | None, target_bytes: int) -> np.ndarray:
    if images_per_shard is not None:
        return np.append(np.arange(0, count, images_per_shard, dtype=np.int64), count)
    assert sizes is not None
    starts = [0]
    total = 0
    for i, size in enumerate(sizes.tolist()):
        if total and total + size > target_bytes:
            starts.append(i)
            total = 0
        total += size
    return np.array([*starts, count], dtype=np.int64)


def _gather_names(
    columns_list: list[ImageColumns], src: np.ndarray, pos: np.ndarray, block: int = 1 << 14
) -> tuple[bytearray, np.ndarray]:
    """The file names of the images ``pos (n,)`` of the sources ``src (n,)``, concatenated in that order,
    and the ``(n + 1,)`` offsets that cut them; numpy gathers ``block`` names at a time straight into
    the result, so memory stays near the result's size."""
    lengths = np.empty(len(pos), dtype=np.int64)
    for s, columns in enumerate(columns_list):
        mask = src == s
        lengths[mask] = np.diff(columns.name_offsets)[pos[mask]]
    offsets = np.concatenate(([0], np.cumsum(lengths)))
    names = bytearray(int(offsets[-1]))
    out = np.frombuffer(names, dtype=np.uint8)
    for s, columns in enumerate(columns_list):
        data = np.frombuffer(columns.names, dtype=np.uint8)
        rows = np.flatnonzero(src == s)
        for lo in range(0, len(rows), block):
            run_rows = rows[lo : lo + block]
            run_lengths = lengths[run_rows]
            within = np.arange(int(run_lengths.sum())) - np.repeat(
                np.cumsum(run_lengths) - run_lengths, run_lengths
            )
            source_at = np.repeat(columns.name_offsets[pos[run_rows]], run_lengths) + within
            out[np.repeat(offsets[run_rows], run_lengths) + within] = data[source_at]
    return names, offsets


def has_staged_plan(split_dir: Path) -> bool:
    """Whether ``split_dir`` holds a plan (of any fingerprint) that an earlier run left."""
    return any((directory / "plan.json").is_file() for directory in split_dir.glob(f"{STAGING_PREFIX}*"))


def build_plan(cfg: ShardStageConfig, sources: list[SourceFile]) -> Plan:
    """Index the sources, partition the images and spill the annotations into a new staging folder named
    after the plan's fingerprint (``plan_fingerprint`` of the annotation files' sha256, taken in the pass).

    Raises:
        AnnotationFileError: a source that is not COCO-style JSON, or sources whose category tables differ.
    """
    split_dir = cfg.split_dir
    work = split_dir / f"{STAGING_PREFIX}tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "ann").mkdir(parents=True)

    columns_list, chosen_list, known_list = [], [], []
    categories: list[Category] | None = None
    annotation_files: list[AnnotationFile] = []
    rejects: list[Reject] = []
    images_listed = 0
    spills = []
    for index, source in enumerate(sources):
        spill, ids_file = work / f"source{index}.jsonl", work / f"source{index}.ids"
        with open(spill, "wb") as spill_handle, open(ids_file, "wb") as ids_handle:
            scanned = scan_coco(source.annotations, spill_handle, ids_handle)
        spills.append((spill, ids_file))
        if categories is not None and scanned.categories != categories:
            raise AnnotationFileError(
                f"{source.annotations}: its category table differs from "
                f"{sources[0].annotations}'s; one split must use one label space"
            )
        categories = scanned.categories
        annotation_files.append(AnnotationFile(str(source.annotations), scanned.sha256))
        chosen, source_rejects = _select(scanned.images, source)
        images_listed += len(chosen) + len(source_rejects)
        rejects += source_rejects
        columns_list.append(scanned.images)
        chosen_list.append(chosen)
        known_list.append(np.unique(scanned.images.ids))
    assert categories is not None

    # Merge the sources' chosen images; an id already taken by an earlier source is a duplicate.
    all_ids = np.concatenate([c.ids[p] for c, p in zip(columns_list, chosen_list)])
    all_sources = np.concatenate([np.full(len(p), i, dtype=np.int16) for i, p in enumerate(chosen_list)])
    all_pos = np.concatenate(chosen_list)
    order = np.lexsort((all_sources, all_ids))
    ids_sorted = all_ids[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ids_sorted[1:] != ids_sorted[:-1]
    rejects += [
        Reject(int(all_ids[i]), R.DUPLICATE_IMAGE_ID, None, "image id listed in two annotation files")
        for i in order[~first]
    ]
    order = order[first]
    if not len(order):
        raise AnnotationFileError(f"{sources[0].annotations}: no usable images in this split")
    ids, src, pos = all_ids[order], all_sources[order], all_pos[order]
    widths = np.empty(len(ids), dtype=np.int32)
    heights = np.empty(len(ids), dtype=np.int32)
    for s, columns in enumerate(columns_list):
        mask = src == s
        widths[mask] = columns.widths[pos[mask]]
        heights[mask] = columns.heights[pos[mask]]
    names, name_offsets = _gather_names(columns_list, src, pos)
    del columns_list

    image_roots = [str(source.image_root) for source in sources]
    sizes = None
    if cfg.shard.images_per_shard is None:
        sizes = _file_sizes(image_roots, src, names, name_offsets)
    shard_starts = _cut(sizes, len(ids), cfg.shard.images_per_shard, int(cfg.shard.target_shard_mb * 2**20))
    shard_of = np.repeat(np.arange(len(shard_starts) - 1, dtype=np.int32), np.diff(shard_starts))

    annotations_listed = 0
    for index, source in enumerate(sources):
        annotations_listed += _route(
            source,
            index,
            spills[index],
            ids,
            src,
            shard_of,
            known_list[index],
            work / "ann",
            cfg.shard.annotation_chunk,
            rejects,
        )
        for path in spills[index]:
            path.unlink()

    fingerprint = plan_fingerprint(cfg, [a.sha256 for a in annotation_files])
    final = staging_dir(split_dir, fingerprint)
    plan = Plan(
        final,
        fingerprint,
        ids,
        widths,
        heights,
        src,
        name_offsets,
        names,
        shard_starts,
        image_roots,
        categories,
        annotation_files,
        rejects,
        images_listed,
        annotations_listed,
    )
    _save(plan, work)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(work, final)
    return plan


def _annotation_id(line: bytes) -> int | None:
    try:
        value = json.loads(line).get("id")
    except (ValueError, AttributeError):
        return None
    return value if type(value) is int else None


_SPILL_READ = 16 << 20
"""Bytes of the spill read at a time by ``_spill_blocks`` (the driver holds about twice this)."""


def _spill_blocks(spill: tuple[Path, Path], max_lines: int) -> Iterator[tuple[list[bytes], np.ndarray]]:
    """The spilled annotation lines (without their newline) with their image ids, at most ``max_lines``
    at a time; read ``_SPILL_READ`` bytes at a time and split in one call, not line by line."""
    lines_path, ids_path = spill
    with open(lines_path, "rb") as lines_handle, open(ids_path, "rb") as ids_handle:
        rest = b""
        while data := lines_handle.read(_SPILL_READ):
            data = rest + data
            cut = data.rfind(b"\n") + 1
            lines, rest = data[: cut - 1].split(b"\n") if cut else [], data[cut:]
            for lo in range(0, len(lines), max_lines):
                part = lines[lo : lo + max_lines]
                yield part, np.frombuffer(ids_handle.read(8 * len(part)), dtype=np.int64)


def _route(
    source: SourceFile,
    index: int,
    spill: tuple[Path, Path],
    ids: np.ndarray,
    src: np.ndarray,
    shard_of: np.ndarray,
    known: np.ndarray,
    ann_dir: Path,
    block: int,
    rejects: list[Reject],
) -> int:
    """Append each spilled annotation of ``source`` to its shard's file; returns how many were listed.

    A shard file holds its annotations' JSON as in the source, one per line. Annotations of images this
    split does not take (the other split, rejected images) are skipped without a reject: the image-level
    reject or the other split accounts for them.
    """
    listed = 0
    last = max(len(ids) - 1, 0)
    for lines, image_ids in _spill_blocks(spill, block):
        valid = image_ids != MISSING_ID
        where = np.searchsorted(ids, image_ids).clip(max=last)
        taken = valid & (ids[where] == image_ids) & (src[where] == index)
        unknown = valid & (
            known[np.searchsorted(known, image_ids).clip(max=max(len(known) - 1, 0))] != image_ids
        )
        listed += int(taken.sum() + unknown.sum() + (~valid).sum())
        for i in np.flatnonzero(~valid).tolist():
            rejects.append(
                Reject(-1, R.MALFORMED_ANNOTATION, _annotation_id(lines[i]), "no integer 'image_id'")
            )
        for i in np.flatnonzero(unknown).tolist():
            rejects.append(
                Reject(
                    int(image_ids[i]),
                    R.UNKNOWN_IMAGE,
                    _annotation_id(lines[i]),
                    f"no image {image_ids[i]} in {source.annotations.name}",
                )
            )
        rows = np.flatnonzero(taken)
        shards = shard_of[where[rows]]
        order = np.argsort(shards, kind="stable")
        rows, shards = rows[order].tolist(), shards[order]
        bounds = [0, *(np.flatnonzero(np.diff(shards)) + 1).tolist(), len(rows)]
        for lo, hi in itertools.pairwise(bounds):
            if hi > lo:
                with open(ann_dir / f"{int(shards[lo]):06d}.jsonl", "ab") as handle:
                    handle.write(b"\n".join(map(lines.__getitem__, rows[lo:hi])) + b"\n")
    return listed


def _save(plan: Plan, directory: Path) -> None:
    np.savez(
        directory / "plan.npz",
        ids=plan.ids,
        widths=plan.widths,
        heights=plan.heights,
        sources=plan.sources,
        name_offsets=plan.name_offsets,
        names=np.frombuffer(plan.names, dtype=np.uint8),
        shard_starts=plan.shard_starts,
    )
    meta = {
        "fingerprint": plan.fingerprint,
        "image_roots": plan.image_roots,
        "categories": [asdict(c) for c in plan.categories],
        "annotation_files": [asdict(a) for a in plan.annotation_files],
        "index_rejects": [asdict(r) for r in plan.index_rejects],
        "images_listed": plan.images_listed,
        "annotations_listed": plan.annotations_listed,
    }
    (directory / "plan.json").write_text(json.dumps(meta), encoding="utf-8")


def load_plan(directory: Path) -> Plan | None:
    """The complete plan in ``directory``, or None when there is none (or it is unreadable)."""
    try:
        meta = json.loads((directory / "plan.json").read_text(encoding="utf-8"))
        arrays = np.load(directory / "plan.npz")
        return Plan(
            directory,
            meta["fingerprint"],
            arrays["ids"],
            arrays["widths"],
            arrays["heights"],
            arrays["sources"],
            arrays["name_offsets"],
            arrays["names"].tobytes(),
            arrays["shard_starts"],
            meta["image_roots"],
            [Category(**c) for c in meta["categories"]],
            [AnnotationFile(**a) for a in meta["annotation_files"]],
            [Reject(**r) for r in meta["index_rejects"]],
            meta["images_listed"],
            meta["annotations_listed"],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
