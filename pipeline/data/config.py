"""Typed configuration of the data stage (sharding, verification, the embedded dataset).

These dataclasses are the Hydra schemas of ``python -m pipeline shard`` and ``make-demo-data``; fields use
only types OmegaConf can check. Every ``__post_init__`` names the offending key, so a bad value fails
before any file is read or any Ray worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DATASET_KINDS = ("coco", "o365", "coco_format")
SPLITS = {"coco": ("train", "val"), "o365": ("train", "val")}
DECODE_CHECKS = ("structure", "draft", "full")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class DatasetConfig:
    """Which dataset to shard and where its images and annotations are.

    ``coco``: ``root`` holds ``train2017/``, ``val2017/`` and ``annotations/instances_<split>2017.json``.
    ``o365``: ``root`` holds ``zhiyuan_objv2_{train,val}.json`` and the ``images/v{1,2}/patch*/`` folders
    that the JSON's ``file_name`` values are relative to. ``coco_format``: any COCO-style JSON
    (``annotations``) whose ``file_name`` values are relative to ``images``.
    """

    kind: str = "coco_format"
    """``coco``, ``o365`` or ``coco_format``."""
    name: str = ""
    """Output dataset name (``<out>/<name>/<split>/``, shard prefix); empty: the kind."""
    split: str = "train"
    """``train``/``val`` for coco and o365; any name for coco_format."""
    root: Path | None = None
    """Dataset root (coco, o365)."""
    images: Path | None = None
    """Image root the JSON's ``file_name`` values are relative to (coco_format; overrides the layout's)."""
    annotations: Path | None = None
    """The COCO-format annotation JSON (coco_format; overrides the layout's)."""
    o365_val_holdout: int = 5000
    """Objects365: this many val images (lowest ids) form the val split; the other val images join train."""

    def __post_init__(self) -> None:
        _require(
            self.kind in DATASET_KINDS, f"dataset.kind must be one of {DATASET_KINDS}, got {self.kind!r}"
        )
        _require(
            bool(self.split) and "/" not in self.split,
            f"dataset.split must be a plain name, got {self.split!r}",
        )
        if self.kind in SPLITS:
            _require(
                self.split in SPLITS[self.kind],
                f"dataset.split must be one of {SPLITS[self.kind]} for {self.kind}, got {self.split!r}",
            )
        _require("/" not in self.name, f"dataset.name must be a plain name, got {self.name!r}")
        _require(
            self.o365_val_holdout >= 0, f"dataset.o365_val_holdout must be >= 0, got {self.o365_val_holdout}"
        )

    @property
    def dataset_name(self) -> str:
        """The name used in output paths and shard names."""
        return self.name or self.kind


@dataclass(frozen=True)
class ShardConfig:
    """How images are grouped into shards and how strict the stage is."""

    images_per_shard: int | None = None
    """Images per shard; None: cut shards at ``target_shard_mb`` of image bytes instead."""
    target_shard_mb: float = 256.0
    """Target shard size in MiB when ``images_per_shard`` is None (WebDataset likes 100 MB - 1 GB)."""
    max_reject_fraction: float = 0.01
    """Fail the stage when more than this fraction of images, or of annotations, is rejected."""
    decode_check: str = "structure"
    """How each image is proven to decode: ``structure`` (JPEG markers, tables and scans as libjpeg reads
    them; anything else decoded as ``draft``), ``draft`` (every scan entropy-decoded at reduced scale),
    ``full`` (full-size decode)."""
    ray_address: str | None = None
    """Ray cluster to use (``auto``, ``ray://host:10001``, ``host:6379``); None: start a local Ray."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None: all); ignored with ``ray_address``."""
    max_in_flight: int | None = None
    """Shard tasks submitted at once (None: twice the cluster's CPUs), bounding driver and store memory."""
    annotation_chunk: int = 100_000
    """Spilled annotation lines the driver routes to per-shard files at a time (bounds its memory)."""

    def __post_init__(self) -> None:
        _require(
            self.images_per_shard is None or self.images_per_shard >= 1,
            f"shard.images_per_shard must be >= 1 (or null), got {self.images_per_shard}",
        )
        _require(self.target_shard_mb > 0, f"shard.target_shard_mb must be > 0, got {self.target_shard_mb}")
        _require(
            0.0 <= self.max_reject_fraction <= 1.0,
            f"shard.max_reject_fraction must be in [0, 1], got {self.max_reject_fraction}",
        )
        _require(
            self.decode_check in DECODE_CHECKS,
            f"shard.decode_check must be one of {DECODE_CHECKS}, got {self.decode_check!r}",
        )
        _require(
            self.num_cpus is None or self.num_cpus >= 1, f"shard.num_cpus must be >= 1, got {self.num_cpus}"
        )
        _require(
            self.max_in_flight is None or self.max_in_flight >= 1,
            f"shard.max_in_flight must be >= 1, got {self.max_in_flight}",
        )
        _require(
            self.annotation_chunk >= 1, f"shard.annotation_chunk must be >= 1, got {self.annotation_chunk}"
        )


@dataclass(frozen=True)
class ShardStageConfig:
    """``python -m pipeline shard``: shard one split of a dataset into ``<out>/<name>/<split>/``."""

    out: Path = Path("outputs/shards")
    """Output root; the split's shards and manifest go to ``<out>/<dataset name>/<split>/``."""
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    verify: bool = False
    """Only re-read every shard of the existing output and check it against the manifest."""

    def __post_init__(self) -> None:
        data = self.dataset
        if data.kind == "coco_format":
            _require(data.images is not None, "dataset.images must be set for coco_format (the image root)")
            _require(
                data.annotations is not None, "dataset.annotations must be set for coco_format (the JSON)"
            )
        else:
            _require(
                data.root is not None or (data.images is not None and data.annotations is not None),
                f"dataset.root must be set for {data.kind} (the folder holding its images and JSON)",
            )

    @property
    def split_dir(self) -> Path:
        """``<out>/<dataset name>/<split>``: where the shards and ``manifest.json`` go."""
        return Path(self.out) / self.dataset.dataset_name / self.dataset.split


@dataclass(frozen=True)
class DemoDataConfig:
    """``python -m pipeline make-demo-data``: the embedded, learnable shapes dataset (COCO format)."""

    out: Path = Path("outputs/demo_data")
    seed: int = 0
    pretrain_train: int = 480
    """Images of the pretraining train split."""
    pretrain_val: int = 80
    finetune_train: int = 320
    finetune_val: int = 80
    min_size: int = 256
    """Smallest image side in pixels."""
    max_size: int = 384
    """Largest image side in pixels."""
    max_objects: int = 6
    """Objects per image are drawn from 1..max_objects."""
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for key in ("pretrain_train", "pretrain_val", "finetune_train", "finetune_val"):
            _require(getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        _require(
            64 <= self.min_size <= self.max_size,
            f"min_size must be in [64, max_size], got {self.min_size} (max_size {self.max_size})",
        )
        _require(1 <= self.max_objects <= 20, f"max_objects must be in [1, 20], got {self.max_objects}")
        _require(1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
