"""COCO-format annotation files, read as streams so memory does not grow with the number of boxes.

A COCO JSON is read twice with ijson's C parser: once for ``images`` and ``categories`` (kept as numpy
columns and one bytes blob of file names, no Python object per image) and once for ``annotations``,
which are handed out in bounded chunks for the caller to spill to disk. Nothing here holds a Python
object per annotation beyond one chunk. Dataset layouts (COCO 2017 folders, any COCO-format pair, and
Objects365 through :mod:`pipeline.data.objects365`) resolve to a list of :class:`SourceFile`.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ijson
import numpy as np

from pipeline.data.config import DatasetConfig
from pipeline.data.manifest import Category

READ_CHUNK = 1 << 20


_NON_FINITE = re.compile(rb"(?<=[\[,:\s])(-?Infinity|NaN)(?=[\s,\]}])")
_TOKEN_ENDS = (b",", b"]", b"}", b"\n")


class NonFiniteFilter:
    """Replaces the non-standard ``NaN``/``Infinity`` literals (as Python's json writes them) by ``null``.

    ijson's C parser rejects them, which would fail a whole file for one bad box; as ``null`` they reach
    the annotation checks and become ``non_finite_box`` rejects. Chunks are cut after a token end so a
    literal is never split between two reads.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._last = b" "

    def feed(self, chunk: bytes) -> bytes:
        """The filtered bytes that are complete so far (call with ``b""`` at the end for the rest)."""
        data = self._carry + chunk
        cut = len(data) if not chunk else max(data.rfind(end) for end in _TOKEN_ENDS) + 1
        data, self._carry = data[:cut], data[cut:]
        if b"NaN" in data or b"Infinity" in data:
            # One byte of the previous piece gives the look-behind its delimiter.
            data = _NON_FINITE.sub(b"null", self._last + data)[1:]
        self._last = data[-1:] or self._last
        return data


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


@dataclass
class ImageIndex:
    """What the first pass over an annotation file yields."""

    images: ImageColumns
    categories: list[Category]
    sha256: str
    bytes: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_error(path: Path, error: Exception) -> AnnotationFileError:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return AnnotationFileError(f"{path}: not valid JSON ({message}); is the file complete?")


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


def scan_images(path: Path) -> ImageIndex:
    """First pass: the images and categories of a COCO-format file, and the file's sha256.

    Raises:
        AnnotationFileError: invalid JSON, or records that are not COCO-style (the message says which).
    """
    ids, widths, heights = array("q"), array("i"), array("i")
    offsets = array("q", [0])
    names = bytearray()
    categories: list[Category] = []
    image_events: list[Any] = ijson.sendable_list()
    category_events: list[Any] = ijson.sendable_list()
    image_parser = ijson.items_coro(image_events, "images.item", use_float=True)
    category_parser = ijson.items_coro(category_events, "categories.item", use_float=True)
    digest = hashlib.sha256()
    done = 0
    report = _progress("indexing images of", path)
    filtered = NonFiniteFilter()
    try:
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(READ_CHUNK)
                digest.update(chunk)
                done += len(chunk)
                data = filtered.feed(chunk)
                if data:  # an empty send means end of input to ijson
                    image_parser.send(data)
                    category_parser.send(data)
                for record in image_events:
                    if not (
                        isinstance(record, dict)
                        and _is_int(record.get("id"))
                        and isinstance(record.get("file_name"), str)
                        and _is_int(record.get("width"))
                        and _is_int(record.get("height"))
                        and record["width"] > 0
                        and record["height"] > 0
                    ):
                        raise AnnotationFileError(
                            f"{path}: images[{len(ids)}] is not a COCO image record (needs an integer 'id', "
                            "a string 'file_name' and positive integer 'width' and 'height'): "
                            f"{str(record)[:200]}"
                        )
                    ids.append(record["id"])
                    widths.append(record["width"])
                    heights.append(record["height"])
                    names += record["file_name"].encode("utf-8")
                    offsets.append(len(names))
                image_events.clear()
                for record in category_events:
                    if not (
                        isinstance(record, dict)
                        and _is_int(record.get("id"))
                        and isinstance(record.get("name"), str)
                    ):
                        raise AnnotationFileError(
                            f"{path}: categories[{len(categories)}] is not a COCO category "
                            f"(needs an integer 'id' and a string 'name'): {str(record)[:200]}"
                        )
                    categories.append(
                        Category(record["id"], record["name"], str(record.get("supercategory", "")))
                    )
                category_events.clear()
                report(done, False)
                if not chunk:
                    break
            image_parser.close()
            category_parser.close()
    except ijson.JSONError as error:
        raise _json_error(path, error) from None
    if not ids:
        raise AnnotationFileError(f"{path}: no images: COCO-style JSON needs a non-empty 'images' list")
    if not categories:
        raise AnnotationFileError(f"{path}: no categories: COCO-style JSON needs a 'categories' list")
    if len({category.id for category in categories}) != len(categories):
        raise AnnotationFileError(f"{path}: duplicate category ids in 'categories'")
    report(done, True)
    columns = ImageColumns(
        np.frombuffer(ids, dtype=np.int64).copy(),
        np.frombuffer(widths, dtype=np.int32).copy(),
        np.frombuffer(heights, dtype=np.int32).copy(),
        np.frombuffer(offsets, dtype=np.int64).copy(),
        bytes(names),
    )
    return ImageIndex(columns, sorted(categories, key=lambda c: c.id), digest.hexdigest(), done)


def iter_annotation_chunks(path: Path, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    """Second pass: the ``annotations`` of a COCO-format file in lists of at most ``chunk_size``.

    Raises:
        AnnotationFileError: invalid JSON or an annotation that is not an object.
    """
    events: list[Any] = ijson.sendable_list()
    parser = ijson.items_coro(events, "annotations.item", use_float=True)
    pending: list[dict[str, Any]] = []
    done = 0
    report = _progress("reading annotations of", path)
    filtered = NonFiniteFilter()
    try:
        with open(path, "rb") as handle:
            while True:
                chunk = handle.read(READ_CHUNK)
                done += len(chunk)
                data = filtered.feed(chunk)
                if data:  # an empty send means end of input to ijson
                    parser.send(data)
                for record in events:
                    if not isinstance(record, dict):
                        raise AnnotationFileError(
                            f"{path}: an entry of 'annotations' is not an object: {str(record)[:200]}"
                        )
                    pending.append(record)
                events.clear()
                while len(pending) >= chunk_size:
                    yield pending[:chunk_size]
                    del pending[:chunk_size]
                report(done, False)
                if not chunk:
                    break
            parser.close()
            pending.extend(events)
    except ijson.JSONError as error:
        raise _json_error(path, error) from None
    if pending:
        yield pending
    report(done, True)


def is_safe_file_name(name: str) -> bool:
    """Whether ``name`` stays inside the image root (relative, no ``..`` escaping it, no NUL)."""
    if not name or "\x00" in name or os.path.isabs(name) or name.startswith("~"):
        return False
    normal = os.path.normpath(name)
    return normal != ".." and not normal.startswith(".." + os.sep)
