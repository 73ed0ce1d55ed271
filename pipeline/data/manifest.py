"""The shard manifest: what a sharded split contains, written last by the shard stage, read by every reader.

``<out>/<dataset>/<split>/manifest.json`` (contract 2 in DESIGN.md). It is the only index of a split:
readers take the shard list, the sample counts (epoch lengths), the category table and the content
hashes from it, and it pins the annotation files the shards came from. It is written deterministically
(no timestamps, sorted lists), so rerunning the stage over the same input yields the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
KEY_DIGITS = 12
"""``__key__`` of a sample: the image id zero-padded to this many digits."""


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, not JSON, of another schema version or inconsistent."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard file of the split."""

    name: str
    """File name, relative to the manifest's folder (``<dataset>-<split>-%06d.tar``)."""
    num_samples: int
    num_annotations: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Category:
    """One entry of the dataset's category table (ids in the dataset's own id space)."""

    id: int
    name: str
    supercategory: str = ""


@dataclass(frozen=True)
class AnnotationFile:
    """A source annotation file the split was made from."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Reject:
    """An input that was skipped: a whole image (``annotation_id`` None) or one annotation."""

    image_id: int
    reason: str
    annotation_id: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class Manifest:
    """A sharded split. ``num_samples`` is what epoch lengths are computed from."""

    schema_version: int
    dataset: str
    split: str
    kind: str
    num_samples: int
    num_annotations: int
    shards: list[ShardEntry]
    categories: list[Category]
    annotation_files: list[AnnotationFile]
    rejects: list[Reject]
    reject_counts: dict[str, int]
    """Rejects per reason (also counts fixes that kept the annotation, e.g. ``box_clipped``)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The partition and checking settings the shards were written with (a rerun must match them)."""
    location: str = ""
    """Where this manifest was read from (path or URL); not serialised."""

    def shard_locations(self) -> list[str]:
        """Each shard's path or URL: the manifest's folder joined with the shard name."""
        base = self.location.rsplit("/", 1)[0] if "/" in self.location else "."
        return [f"{base}/{shard.name}" for shard in self.shards]

    def check_local_shards(self, template: str | None = None) -> None:
        """Fail naming the shards of a split on local disk that are missing or not of their recorded size
        (a deleted or truncated shard would otherwise fail when first read, possibly hours into training).

        ``template``: where the shard files are instead of beside the manifest, with ``{name}`` for each
        shard's file name (``shards=`` of eval and training); a template of a URL or ``pipe:`` command is
        left to the reader, as is a manifest read from a URL without one.

        Raises:
            ManifestError: a template without ``{name}`` or with other fields, or naming up to five shards
                that are missing or incomplete and what to do.
        """
        if template is None:
            if is_remote(self.location):
                return
            locations = self.shard_locations()
        else:
            locations = shard_template_locations(self, template)
            if is_remote(template):
                return
        bad = []
        for shard, location in zip(self.shards, locations):
            try:
                size = os.stat(location).st_size
            except OSError:
                bad.append(f"{location} (missing)" if template else f"{shard.name} (missing)")
                continue
            if size != shard.bytes:
                bad.append(f"{shard.name} ({size} bytes, the manifest says {shard.bytes})")
        if not bad:
            return
        if template is not None:
            raise ManifestError(
                f"shards={template!r}: {len(bad)} of the {len(self.shards)} shard(s) of {self.location} are "
                f"missing or incomplete there: {', '.join(bad[:5])}; point shards= at the folder that "
                "holds them ('/dir/{name}'), or leave it out to read the shards beside the manifest"
            )
        raise ManifestError(
            f"{self.location}: {len(bad)} shard(s) missing or incomplete: {', '.join(bad[:5])}; check "
            "the split with `python -m pipeline shard ... verify=true`, move it aside and shard it again"
        )

    def category_names(self) -> dict[int, str]:
        """Category id -> name."""
        return {category.id: category.name for category in self.categories}

    def to_json(self) -> str:
        """The canonical serialisation (sorted rejects, fixed key order, trailing newline)."""
        data = asdict(self)
        data.pop("location")
        data["rejects"] = sorted(data["rejects"], key=_reject_order)
        data["reject_counts"] = dict(sorted(data["reject_counts"].items()))
        return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def is_remote(location: str) -> bool:
    """A URL (``http://``, ``s3://``, ...) or a ``pipe:`` command: read by WebDataset's gopen, not checked."""
    return location.startswith("pipe:") or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", location) is not None


def shard_template_locations(manifest: Manifest, template: str) -> list[str]:
    """Each shard's location under ``template`` (``{name}``: its file name).

    Raises:
        ManifestError: a template without ``{name}`` (every shard would be the same file) or with another
            field, such as a WebDataset brace range (the manifest lists the shards: ``{name}`` names them).
    """
    fix = "name each shard's file with {name}, e.g. shards='/mnt/copy/{name}' (the manifest lists the shards)"
    try:
        locations = [template.format(name=shard.name) for shard in manifest.shards]
    except (KeyError, IndexError, ValueError, AttributeError) as error:
        raise ManifestError(
            f"shards={template!r} is not a shard template ({type(error).__name__}: {error}): {fix}"
        ) from None
    if "{name}" not in template:
        raise ManifestError(
            f"shards={template!r} has no {{name}}, so every shard would be that one file: {fix}"
        )
    return locations


def _reject_order(reject: dict[str, Any]) -> tuple[int, int, str, str]:
    annotation_id = reject["annotation_id"]
    return (
        reject["image_id"],
        -1 if annotation_id is None else annotation_id,
        reject["reason"],
        reject["detail"],
    )


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write ``manifest`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_text(location: str | Path) -> str:
    """The text of a local file or an http(s) URL (manifests are small)."""
    text = str(location)
    if text.startswith(("http://", "https://")):
        with urllib.request.urlopen(text, timeout=60) as response:
            return response.read().decode("utf-8")
    return Path(text).read_text(encoding="utf-8")


def _is_tar(location: str) -> bool:
    """A local file that is a tar archive (``ustar`` at byte 257), whatever its name."""
    if location.startswith(("http://", "https://")):
        return False
    try:
        with open(location, "rb") as handle:
            return handle.read(265)[257:262] == b"ustar"
    except OSError:
        return False


def load_manifest(location: str | Path) -> Manifest:
    """Read and check a manifest from a path (file or split folder) or an http(s) URL.

    Raises:
        ManifestError: missing, unreadable, not JSON, wrong schema version, or inconsistent counts;
            the message names the location and what to do.
    """
    text_location = str(location)
    if not text_location.startswith(("http://", "https://")) and Path(text_location).is_dir():
        text_location = str(Path(text_location) / MANIFEST_NAME)
    if text_location.endswith(".tar") or _is_tar(text_location):
        folder = text_location.rsplit("/", 1)[0] if "/" in text_location else "."
        raise ManifestError(
            f"{text_location} is a shard (a tar file), not a manifest: give the split's manifest.json or the "
            f"folder holding it, e.g. {folder}/{MANIFEST_NAME} or {folder}"
        )
    try:
        text = read_text(text_location)
    except FileNotFoundError:
        raise ManifestError(
            f"{text_location}: no manifest here; run `python -m pipeline shard` for this "
            "split first (the manifest is written last, so a missing one means the stage did "
            "not finish)"
        ) from None
    except (OSError, urllib.error.URLError, UnicodeDecodeError) as error:
        raise ManifestError(f"{text_location}: cannot read the manifest: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(
            f"{text_location}: corrupt manifest (not JSON: {error}); rerun the shard stage to rewrite it"
        ) from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ManifestError(f"{text_location}: not a shard manifest (no schema_version)")
    if data["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(
            f"{text_location}: manifest schema version {data['schema_version']!r}, this code "
            f"reads version {SCHEMA_VERSION}; reshard with this version of the pipeline"
        )
    try:
        manifest = Manifest(
            schema_version=data["schema_version"],
            dataset=data["dataset"],
            split=data["split"],
            kind=data["kind"],
            num_samples=int(data["num_samples"]),
            num_annotations=int(data["num_annotations"]),
            shards=[ShardEntry(**entry) for entry in data["shards"]],
            categories=[Category(**entry) for entry in data["categories"]],
            annotation_files=[AnnotationFile(**entry) for entry in data["annotation_files"]],
            rejects=[Reject(**entry) for entry in data["rejects"]],
            reject_counts={str(k): int(v) for k, v in data["reject_counts"].items()},
            config=dict(data.get("config", {})),
            location=text_location,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ManifestError(
            f"{text_location}: malformed manifest ({type(error).__name__}: {error})"
        ) from None
    if sum(shard.num_samples for shard in manifest.shards) != manifest.num_samples:
        raise ManifestError(
            f"{text_location}: num_samples {manifest.num_samples} differs from the sum over "
            "its shards; the manifest is corrupt, rerun the shard stage"
        )
    return manifest
