"""COCO-format annotation files, read in one pass so memory does not grow with the number of boxes.

``scan_coco`` walks a file once with :mod:`pipeline.data.json_sections`: the ``images`` section is parsed
a chunk of elements at a time into numpy columns and one bytes blob of file names (no Python object per
image is kept), ``categories`` with ``json``, and each annotation is copied unparsed, one per line, to a spill
file with its ``image_id`` beside it in a binary int64 file. Dataset layouts (COCO 2017 folders, any
COCO-format pair, Objects365 through :mod:`pipeline.data.objects365`) resolve to :class:`SourceFile` lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.data import json_sections
from pipeline.data.config import DatasetConfig
from pipeline.data.json_sections import SEPARATOR
from pipeline.data.manifest import Category

READ_CHUNK = 1 << 20


class AnnotationFileError(ValueError):
    """An annotation file that is missing or not COCO-style JSON; the message names the file and problem."""


@dataclass(frozen=True)
class SourceFile:
    """One annotation file of a split and which of its images the split takes.

    Images are ranked by id; the split takes those with rank in ``[skip_lowest, keep_lowest)``
    (``keep_lowest`` None: to the end). That expresses the Objects365 recipe (the first 5,000 val images
    are val, the rest join train) and "all images" alike.
    """

    annotations: Path
    image_root: Path
    skip_lowest: int = 0
    keep_lowest: int | None = None


def resolve_sources(cfg: DatasetConfig) -> list[SourceFile]:
    """The annotation files and image roots of a dataset split, from its layout."""
    if cfg.kind == "o365":
        from pipeline.data.objects365 import o365_sources

        return o365_sources(cfg)
    if cfg.kind == "coco":
        root = Path(cfg.root) if cfg.root is not None else None
        images = Path(cfg.images) if cfg.images is not None else root / f"{cfg.split}2017"  # type: ignore[operator]
        annotations = (
            Path(cfg.annotations)
            if cfg.annotations is not None
            else root / "annotations" / f"instances_{cfg.split}2017.json"
        )  # type: ignore[operator]
        return [SourceFile(annotations, images)]
    return [SourceFile(Path(cfg.annotations), Path(cfg.images))]  # type: ignore[arg-type]


def check_source_paths(sources: list[SourceFile]) -> None:
    """Fail before any work if an annotation file or image root is missing or the JSON is not an object.

    Raises:
        AnnotationFileError: naming the path and what to pass instead.
    """
    for source in sources:
        path = source.annotations
        if not path.is_file():
            raise AnnotationFileError(
                f"{path}: annotation file not found (set dataset.annotations or "
                "dataset.root to the folder that holds it)"
            )
        if not source.image_root.is_dir():
            raise AnnotationFileError(
                f"{source.image_root}: image root not found (set dataset.images or dataset.root)"
            )
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        if not head.startswith(b"{"):
            shown = head[:20].decode("utf-8", "replace")
            raise AnnotationFileError(
                f"{path}: not COCO-style JSON: the top level must be an object with "
                f"'images', 'annotations' and 'categories', the file starts with {shown!r}"
            )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ImageColumns:
    """The ``images`` of one annotation file as columns, in file order.

    ``ids (n,) int64``, ``widths``/``heights (n,) int32``, file names as one UTF-8 blob cut at
    ``name_offsets (n + 1,) int64``.
    """

    ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    name_offsets: np.ndarray
    names: bytes

    def __len__(self) -> int:
        return len(self.ids)

    def file_name(self, index: int) -> str:
        """The ``file_name`` of image ``index``."""
        return self.names[self.name_offsets[index] : self.name_offsets[index + 1]].decode("utf-8")


MISSING_ID = np.iinfo(np.int64).min
"""Stored for an annotation without an integer ``image_id``."""
_IMAGE_ID = re.compile(rb'"image_id"\s*:\s*(-?\d+)\s*[,}]')
_MAX_CATEGORIES_BYTES = 64 << 20


def annotation_image_id(raw: bytes) -> int | None:
    """The first ``"image_id": <integer>`` in an annotation's raw JSON, which the driver routes it by."""
    match = _IMAGE_ID.search(raw)
    return int(match.group(1)) if match else None


@dataclass
class ScannedFile:
    """What one pass over an annotation file yields (the annotations themselves went to the spill)."""

    images: ImageColumns
    categories: list[Category]
    sha256: str
    bytes: int
    annotations: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _progress(label: str, path: Path) -> Callable[[int, bool], None]:
    total = max(1, path.stat().st_size)
    start = last = time.monotonic()

    def report(done: int, final: bool = False) -> None:
        nonlocal last
        now = time.monotonic()
        if final or now - last >= 10.0:
            last = now
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            print(
                f"[shard] {label} {path.name}: {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB, "
                f"{rate / 2**20:.1f} MiB/s, ETA {eta:.0f} s",
                flush=True,
            )

    return report


class _ImageCollector:
    """Image records -> columns, checking each is COCO-style."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._columns: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._names = bytearray()

    def _fail(self, index: int, record: Any, need: str) -> None:
        raise AnnotationFileError(
            f"{self.path}: images[{index}] is not a COCO image record ({need}): {str(record)[:200]}"
        )

    def _check(self, index: int, record: Any) -> None:
        """Raise naming the first reason ``record`` (``images[index]``) is not a COCO image record."""
        if not (
            isinstance(record, dict)
            and _is_int(record.get("id"))
            and isinstance(record.get("file_name"), str)
            and _is_int(record.get("width"))
            and _is_int(record.get("height"))
        ):
            self._fail(
                index,
                record,
                "needs an integer 'id', a string 'file_name' and positive integer 'width' and 'height'",
            )
        if not -(2**63) <= record["id"] < 2**63:
            self._fail(index, record, "its 'id' does not fit in 64 bits")
        if not (0 < record["width"] < 2**31 and 0 < record["height"] < 2**31):
            self._fail(index, record, "'width' and 'height' must be positive 32-bit integers")
        try:
            record["file_name"].encode("utf-8")
        except UnicodeEncodeError:
            self._fail(index, record, "its 'file_name' is not valid Unicode")

    def extend(self, records: list[Any]) -> None:
        """Add parsed ``images`` elements, in file order, as columns (no Python object per image kept).

        Raises:
            AnnotationFileError: the first record that is not COCO-style, named by its index.
        """
        try:
            ids, names = [r["id"] for r in records], [r["file_name"] for r in records]
            widths, heights = [r["width"] for r in records], [r["height"] for r in records]
            valid = all(type(v) is int for v in (*ids, *widths, *heights)) and all(
                type(n) is str for n in names
            )
            columns = (
                np.array(ids, dtype=np.int64),
                np.array(widths, dtype=np.int32),
                np.array(heights, dtype=np.int32),
            )
            valid = valid and bool((columns[1] > 0).all() and (columns[2] > 0).all())
            encoded = [n.encode("utf-8") for n in names]
        except (KeyError, TypeError, OverflowError, UnicodeEncodeError):
            valid = False
        if not valid:
            for i, record in enumerate(records):
                self._check(self.count + i, record)
            raise AnnotationFileError(f"{self.path}: 'images' holds records that are not COCO image records")
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        self._columns.append((*columns, len(self._names) + np.cumsum(lengths)))
        self._names += b"".join(encoded)
        self.count += len(records)

    def columns(self) -> ImageColumns:
        """All images added so far."""
        parts = list(zip(*self._columns)) or [[np.zeros(0, np.int64)]] * 4
        return ImageColumns(
            np.concatenate(parts[0]).astype(np.int64),
            np.concatenate(parts[1]).astype(np.int32),
            np.concatenate(parts[2]).astype(np.int32),
            np.concatenate([np.zeros(1, np.int64), *parts[3]]),
            bytes(self._names),
        )


def _categories(path: Path, data: bytes) -> list[Category]:
    try:
        records = json.loads(data)
    except json.JSONDecodeError as error:
        raise AnnotationFileError(f"{path}: 'categories' is not valid JSON ({error})") from None
    categories = []
    for i, record in enumerate(records if isinstance(records, list) else [records]):
        if not (
            isinstance(record, dict) and _is_int(record.get("id")) and isinstance(record.get("name"), str)
        ):
            raise AnnotationFileError(
                f"{path}: categories[{i}] is not a COCO category (needs an integer 'id' "
                f"and a string 'name'): {str(record)[:200]}"
            )
        categories.append(Category(record["id"], record["name"], str(record.get("supercategory", ""))))
    return categories


def _annotation_image_ids(found: list[bytes | int | None]) -> np.ndarray:
    """The ``image_id`` found per annotation (its digits or its value) as int64; ``MISSING_ID`` where none
    was found or the value does not fit in 64 bits (no image can have it: image ids must fit)."""
    try:
        return np.fromiter((MISSING_ID if v is None else int(v) for v in found), np.int64, len(found))
    except OverflowError:
        values = (MISSING_ID if v is None else int(v) for v in found)
        return np.fromiter((v if -(2**63) <= v < 2**63 else MISSING_ID for v in values), np.int64, len(found))


def scan_coco(path: Path, spill: BinaryIO, image_ids: BinaryIO) -> ScannedFile:
    """One pass over a COCO-format file: images and categories parsed, annotations spilled unparsed.

    Each annotation's source bytes go to ``spill`` as one line (newlines, which JSON allows only between
    tokens, become spaces) and its ``image_id`` to ``image_ids`` as int64 (``MISSING_ID`` if absent or
    not an integer), in file order. Only the ``images`` and ``categories`` sections are parsed.

    Raises:
        AnnotationFileError: not COCO-style JSON (the message names the file and the problem).
    """
    images = _ImageCollector(path)
    category_bytes = bytearray()
    digest = hashlib.sha256()
    found: set[str] = set()
    annotations = 0
    report = _progress("indexing", path)
    try:
        with open(path, "rb") as handle:
            hashing = _HashingReader(handle, digest)
            for event in json_sections.scan(
                hashing, frozenset({"categories"}), frozenset({"images", "annotations"})
            ):
                if isinstance(event, json_sections.Elements) and event.key == "images":
                    try:
                        records = event.values()
                    except ValueError as error:
                        raise AnnotationFileError(f"{path}: 'images' is not valid JSON ({error})") from None
                    images.extend(records)
                elif isinstance(event, json_sections.Elements):
                    found.add("annotations")
                    data = event.data
                    if b"\n" in data or b"\r" in data:  # whitespace between tokens (raw newlines are not
                        data = data.replace(b"\n", b" ").replace(b"\r", b" ")  # allowed inside strings)
                    found_ids = _IMAGE_ID.findall(data)
                    if len(found_ids) != event.count:  # some annotation lacks (or repeats) image_id
                        found_ids = [annotation_image_id(raw) for raw in data.split(SEPARATOR)]
                    ids = _annotation_image_ids(found_ids)
                    spill.write(data.replace(SEPARATOR, b"\n") + b"\n")
                    image_ids.write(ids.tobytes())
                    annotations += event.count
                elif isinstance(event, json_sections.Piece):
                    found.add(event.key)
                    category_bytes += event.data
                    if len(category_bytes) > _MAX_CATEGORIES_BYTES:
                        raise AnnotationFileError(f"{path}: 'categories' is larger than 64 MiB")
                else:
                    key, position = event
                    if key == "":
                        report(position, False)
                    else:
                        found.add(key)
    except json_sections.JSONStructureError as error:
        raise AnnotationFileError(f"{path}: not valid JSON ({error})") from None
    columns = images.columns()
    if not len(columns):
        raise AnnotationFileError(f"{path}: no images: COCO-style JSON needs a non-empty 'images' list")
    categories = _categories(path, bytes(category_bytes)) if "categories" in found else []
    if not categories:
        raise AnnotationFileError(f"{path}: no categories: COCO-style JSON needs a 'categories' list")
    if len({category.id for category in categories}) != len(categories):
        raise AnnotationFileError(f"{path}: duplicate category ids in 'categories'")
    report(hashing.bytes, True)
    return ScannedFile(
        columns, sorted(categories, key=lambda c: c.id), digest.hexdigest(), hashing.bytes, annotations
    )


class _HashingReader:
    """A read-only file that hashes and counts what is read through it."""

    def __init__(self, handle: BinaryIO, digest: Any) -> None:
        self._handle, self._digest, self.bytes = handle, digest, 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._digest.update(data)
        self.bytes += len(data)
        return data


def safe_file_names(columns: ImageColumns, positions: np.ndarray) -> np.ndarray:
    """``is_safe_file_name`` of the images at ``positions (k,)``, as a bool array ``(k,)``.

    Where no name holds ``..`` or NUL (as in COCO and Objects365), a name is safe exactly when it is not
    empty and starts with neither ``/`` nor ``~``, which numpy decides for all at once; otherwise each
    name is checked on its own.
    """
    blob = columns.names
    if not blob or b".." in blob or b"\x00" in blob:
        return np.fromiter(
            (is_safe_file_name(columns.file_name(i)) for i in positions.tolist()), bool, len(positions)
        )
    starts, ends = columns.name_offsets[positions], columns.name_offsets[positions + 1]
    first = np.frombuffer(blob, dtype=np.uint8)[np.minimum(starts, len(blob) - 1)]
    return (ends > starts) & (first != ord("/")) & (first != ord("~"))


def is_safe_file_name(name: str) -> bool:
    """Whether ``name`` stays inside the image root (relative, no ``..`` escaping it, no NUL)."""
    if not name or "\x00" in name or os.path.isabs(name) or name.startswith("~"):
        return False
    normal = os.path.normpath(name)
    return normal != ".." and not normal.startswith(".." + os.sep)
