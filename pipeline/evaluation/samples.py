"""Evaluation images as decoded originals with their shard records, each exactly once over ranks x workers.

The data stage's ``eval_loader`` yields transformed, collated batches; evaluation needs more: the
original image (every TTA augmentation starts from it) and the full record (COCO's ``area``, which
decides APs/APm/APl, is not in a batch's targets). This reads the same shards with the data stage's
shard iterator and decoder, and deals them like ``eval_loader``: slot ``rank * W + worker`` reads shards
``slot, slot + R*W, ...``, or with fewer shards than slots every slot reads all of them and keeps samples
``slot, slot + R*W, ...``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.decode import decode_rgb
from pipeline.data.manifest import Manifest
from pipeline.data.stream import RawSample, iter_shard, shard_urls
from pipeline.evaluation.ground_truth import image_record


@dataclass
class EvalSample:
    """One evaluation image: the decoded original and its record (:func:`ground_truth.image_record`)."""

    image: Tensor
    """uint8 (3, H, W), the original image."""
    record: dict[str, Any]
    """``id``, ``file_name``, ``width``, ``height``, ``annotations`` (COCO, the dataset's category ids)."""

    @property
    def image_id(self) -> int:
        """The dataset's image id."""
        return int(self.record["id"])


def decode_eval_sample(raw: RawSample) -> EvalSample:
    """A raw shard sample (``__key__``, ``jpg``/``png``, ``json``) as an :class:`EvalSample`.

    Raises:
        ValueError: the decoded image's size differs from its record's (a corrupt or mismatched shard).
    """
    record = image_record(json.loads(raw["json"]))
    extension = "jpg" if "jpg" in raw else "png"
    image = decode_rgb(raw[extension])
    if (int(image.shape[-2]), int(image.shape[-1])) != (record["height"], record["width"]):
        raise ValueError(
            f"shard sample {raw['__key__']}: the image is {image.shape[-1]}x{image.shape[-2]} but its record "
            f"says {record['width']}x{record['height']}; rerun the shard stage for this split"
        )
    return EvalSample(image=image, record=record)


class EvalSampleStream(IterableDataset):
    """One rank's share of a split's samples (see the module docstring), decoded."""

    def __init__(self, urls: list[str], rank: int, world_size: int) -> None:
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} and world_size {world_size}")
        self.urls, self.rank, self.world_size = urls, rank, world_size

    def __iter__(self) -> Iterator[EvalSample]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        if len(self.urls) >= slots:
            raws: Iterable[RawSample] = (raw for url in self.urls[slot::slots] for raw in iter_shard(url))
        else:
            every = (raw for url in self.urls for raw in iter_shard(url))
            raws = (raw for i, raw in enumerate(every) if i % slots == slot)
        for raw in raws:
            yield decode_eval_sample(raw)


def images_of_rank(manifest: Manifest, rank: int, world_size: int, num_workers: int) -> int:
    """How many images :func:`eval_samples` gives ``rank`` (from the manifest's counts; for the ETA)."""
    workers = max(1, num_workers)
    slots = world_size * workers
    counts = [shard.num_samples for shard in manifest.shards]
    mine = range(rank * workers, (rank + 1) * workers)
    if len(counts) >= slots:
        return sum(sum(counts[slot::slots]) for slot in mine)
    return sum(len(range(slot, sum(counts), slots)) for slot in mine)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def _unbatched(sample: EvalSample) -> EvalSample:
    return sample


def eval_samples(
    manifest: Manifest, rank: int, world_size: int, num_workers: int, shards: str | None = None
) -> Iterable[EvalSample]:
    """A rank's decoded evaluation samples; over all ranks and workers every image exactly once.

    ``shards``: a ``{name}`` template for where the shard files are (None: beside the manifest).
    Decoding runs in ``num_workers`` worker processes (0: in this process).
    """
    dataset = EvalSampleStream(shard_urls(manifest, shards), rank, world_size)
    if num_workers == 0:
        return dataset
    return DataLoader(
        dataset, batch_size=None, num_workers=num_workers, collate_fn=_unbatched, worker_init_fn=_one_thread
    )
