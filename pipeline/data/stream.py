"""Training and evaluation streams of :class:`~pipeline.data.collate.Batch` from sharded splits.

Shards are read through WebDataset's ``gopen`` (local paths, ``http(s)://`` via curl, ``pipe:`` commands)
and its tar iterator. Legend: R ranks, W data-loader workers per rank (W = 1 without workers),
``slot = rank * W + worker``.

Training (``train_loader``): every rank yields exactly ``batches_per_epoch`` batches (from the manifests'
sample counts), so no rank waits for another at the end of an epoch. Global step ``i`` of an epoch is
made by logical worker ``i % W`` as its ``i // W``-th batch, and each logical worker's sample sequence is
a pure function of ``(seed, epoch, rank, W, worker)``: per sample, a source is drawn by weight; per
source, shards are resampled (drawn with replacement, in proportion to their sample counts, from the
worker's own share of the shards when there are at least R * W of them) and each drawn shard is read
whole through a shuffle buffer seeded for that draw. Augmentations are seeded per sample. Hence resuming
at step k of epoch e (``set_epoch(e, start_step=k)``) yields the batches the uninterrupted run would
have, and skipping is cheap: whole shard draws are skipped by their manifest counts without any I/O,
only the one partly used shard is read (not decoded). Change neither W nor R between save and resume.

Evaluation (``eval_loader``): each image exactly once over all ranks and workers. Shards are dealt to
slots round-robin (slot ``s`` reads shards ``s, s + R*W, ...``); with fewer shards than slots every slot
reads all shards and keeps samples ``s, s + R*W, ...``. Ranks may therefore get unequal numbers of
images and batches (the last batch of each worker may be short): gather results, don't assume equal
counts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import tv_tensors

from pipeline.data.collate import Batch, TransformedSample, collate
from pipeline.data.decode import decode_rgb
from pipeline.data.manifest import Manifest, load_manifest, shard_template_locations
from pipeline.data.transforms import Target, make_target

Transform = Callable[[tv_tensors.Image, Target], tuple[torch.Tensor, Target]]
RawSample = dict[str, Any]
CHOICE_BLOCK = 4096
"""Source choices are drawn in blocks of this many samples (replayable from the start of the epoch)."""


@dataclass(frozen=True)
class StreamSource:
    """A sharded split to read: its manifest (path, split folder or http(s) URL) and mixing weight.

    ``shards``: where the shard files are, as a template with ``{name}`` (e.g.
    ``pipe:curl -s https://host/o365/train/{name}``); None: beside the manifest.
    """

    manifest: str
    weight: float = 1.0
    shards: str | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"source weight must be > 0, got {self.weight} for {self.manifest}")


def _as_source(source: StreamSource | tuple[str, float] | str) -> StreamSource:
    if isinstance(source, StreamSource):
        return source
    if isinstance(source, str):
        return StreamSource(source)
    return StreamSource(str(source[0]), float(source[1]))


def shard_urls(manifest: Manifest, template: str | None = None) -> list[str]:
    """The shards of ``manifest`` as paths/URLs (``template`` with ``{name}`` overrides the location).

    Raises:
        ManifestError: a template that is not one (see :func:`shard_template_locations`).
    """
    if template is None:
        return manifest.shard_locations()
    return shard_template_locations(manifest, template)


def iter_shard(url: str) -> Iterator[RawSample]:
    """The samples of one shard, undecoded: ``{"__key__": str, "<ext>": bytes, ...}`` in tar order."""
    stream = wds.gopen(url)
    try:
        current: RawSample | None = None
        for member in wds.tariterators.tar_file_iterator(stream):
            key, _, extension = member["fname"].partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[extension] = member["data"]
        if current is not None:
            yield current
    finally:
        stream.close()


def decode_sample(raw: RawSample) -> tuple[tv_tensors.Image, Target, int, tuple[int, int]]:
    """A raw sample as ``(image uint8 (3, H, W), target with XYXY boxes, image id, (H, W))``."""
    record = json.loads(raw["json"])
    extension = "jpg" if "jpg" in raw else "png"
    image = decode_rgb(raw[extension])
    height, width = int(image.shape[-2]), int(image.shape[-1])
    anns = record["annotations"]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    iscrowd = torch.tensor([bool(a.get("iscrowd", 0)) for a in anns], dtype=torch.bool)
    return (
        tv_tensors.Image(image),
        make_target(boxes, labels, iscrowd, height, width),
        int(record["id"]),
        (height, width),
    )


def _transformed(raw: RawSample, transform: Transform, seed: int | None) -> TransformedSample:
    image, target, image_id, size = decode_sample(raw)
    if seed is None:
        out_image, out_target = transform(image, target)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out_image, out_target = transform(image, target)
    return TransformedSample(out_image.as_subclass(torch.Tensor), out_target, image_id, size)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)


def _passthrough(batch: Batch) -> Batch:
    return batch


@dataclass(frozen=True)
class _LoadedSource:
    urls: list[str]
    counts: np.ndarray
    weight: float


class _SourceStream:
    """One source's samples for one logical worker: resampled shard draws, each read whole, shuffled."""

    def __init__(self, source: _LoadedSource, shard_ids: np.ndarray, rng: np.random.Generator, buffer: int):
        self.source, self.shard_ids, self.rng, self.buffer = source, shard_ids, rng, buffer
        counts = source.counts[shard_ids].astype(np.float64)
        self.p = counts / counts.sum()
        self._samples: Iterator[RawSample] = iter(())

    def _draw(self) -> tuple[int, int]:
        shard = int(self.shard_ids[self.rng.choice(len(self.shard_ids), p=self.p)])
        return shard, int(self.rng.integers(2**63 - 1))

    def _visit(self, shard: int, seed: int) -> Iterator[RawSample]:
        rng = np.random.default_rng(seed)
        pool: list[RawSample] = []
        for raw in iter_shard(self.source.urls[shard]):
            pool.append(raw)
            if len(pool) >= self.buffer:
                yield pool.pop(int(rng.integers(len(pool))))
        while pool:
            yield pool.pop(int(rng.integers(len(pool))))

    def skip(self, count: int) -> None:
        """Advance ``count`` samples; whole shard draws cost no I/O, the last one is read but not decoded."""
        while count > 0:
            shard, seed = self._draw()
            size = int(self.source.counts[shard])
            if count >= size:
                count -= size
                continue
            self._samples = self._visit(shard, seed)
            for _ in range(count):
                next(self._samples)
            count = 0

    def next(self) -> RawSample:
        """The next raw sample (draws a new shard when the current one is used up)."""
        while True:
            try:
                return next(self._samples)
            except StopIteration:
                self._samples = self._visit(*self._draw())


class _TrainStream(IterableDataset):
    def __init__(
        self,
        sources: list[_LoadedSource],
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        transform: Transform,
        batches_per_epoch: int,
        epoch: int,
        start_step: int,
        buffer: int,
        workers: int,
    ) -> None:
        super().__init__()
        self.sources, self.batch_size, self.seed = sources, batch_size, seed
        self.rank, self.world_size, self.transform = rank, world_size, transform
        self.batches_per_epoch, self.epoch, self.start_step = batches_per_epoch, epoch, start_step
        self.buffer, self.workers = buffer, workers

    def _choices(self, logical: int) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, logical, 0])
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        weights /= weights.sum()
        while True:
            yield from rng.choice(len(self.sources), size=CHOICE_BLOCK, p=weights).tolist()

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        assert workers == self.workers, "the stream was built for another number of workers"
        logical = (self.start_step + worker) % workers
        first_step = self.start_step + worker
        slots = self.world_size * workers
        slot = self.rank * workers + logical
        streams = []
        for index, source in enumerate(self.sources):
            shards = np.arange(len(source.urls))
            mine = shards[slot::slots] if len(shards) >= slots else shards
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, logical, 1, index])
            streams.append(_SourceStream(source, mine, rng, self.buffer))
        choices = self._choices(logical)
        position = (first_step // workers) * self.batch_size
        skipped = np.zeros(len(streams), dtype=np.int64)
        for _ in range(position):
            skipped[next(choices)] += 1
        for stream, count in zip(streams, skipped.tolist()):
            stream.skip(count)
        for _ in range(first_step, self.batches_per_epoch, workers):
            samples = []
            for _ in range(self.batch_size):
                raw = streams[next(choices)].next()
                sample_seed = int(
                    np.random.SeedSequence(
                        [self.seed, self.epoch, self.rank, logical, position]
                    ).generate_state(1)[0]
                )
                samples.append(_transformed(raw, self.transform, sample_seed))
                position += 1
            yield collate(samples)


class TrainLoader:
    """The training batches of one rank; ``batches_per_epoch`` is the same on every rank.

    ``set_epoch(epoch, start_step)`` chooses what the next ``iter()`` yields: steps ``start_step ..
    batches_per_epoch - 1`` of ``epoch``, identical to those of an uninterrupted run.
    """

    def __init__(
        self,
        sources: list[_LoadedSource],
        batch_size: int,
        num_workers: int,
        seed: int,
        rank: int,
        world_size: int,
        transform: Transform,
        batches_per_epoch: int,
        shuffle_buffer: int,
    ) -> None:
        self._sources, self.batch_size, self.num_workers = sources, batch_size, num_workers
        self.seed, self.rank, self.world_size, self.transform = seed, rank, world_size, transform
        self.batches_per_epoch, self.shuffle_buffer = batches_per_epoch, shuffle_buffer
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch (and the step to resume from) that the next iteration yields."""
        if not 0 <= start_step <= self.batches_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.batches_per_epoch}], got {start_step}")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_step

    def __iter__(self) -> Iterator[Batch]:
        workers = max(1, self.num_workers)
        dataset = _TrainStream(
            self._sources,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            self.transform,
            self.batches_per_epoch,
            self.epoch,
            self.start_step,
            self.shuffle_buffer,
            workers,
        )
        if self.num_workers == 0:
            return iter(dataset)
        return iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_passthrough,
                worker_init_fn=_init_worker,
            )
        )


def train_loader(
    sources: Sequence[StreamSource | tuple[str, float] | str],
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int,
    world_size: int,
    transform: Transform,
    *,
    epoch_samples: int | None = None,
    shuffle_buffer: int = 64,
) -> TrainLoader:
    """A rank's training stream over weighted sources (see the module docstring).

    ``epoch_samples``: samples per epoch over all ranks (default: the sum of the sources' sample counts);
    ``batches_per_epoch = epoch_samples // (batch_size * world_size)``.

    Raises:
        ManifestError: a source's manifest is missing, corrupt or of another schema version.
        ValueError: bad sizes, or an epoch too short for one batch per rank.
    """
    if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1, num_workers >= 0, 0 <= rank < world_size; got {batch_size}, "
            f"{num_workers}, {rank}, {world_size}"
        )
    loaded = []
    total = 0
    for source in map(_as_source, sources):
        manifest = load_manifest(source.manifest)
        counts = np.array([s.num_samples for s in manifest.shards], dtype=np.int64)
        if counts.sum() == 0:
            raise ValueError(f"{manifest.location}: the split has no samples")
        keep = counts > 0
        urls = [u for u, k in zip(shard_urls(manifest, source.shards), keep) if k]
        loaded.append(_LoadedSource(urls, counts[keep], source.weight))
        total += manifest.num_samples
    if not loaded:
        raise ValueError("train_loader needs at least one source")
    samples = total if epoch_samples is None else epoch_samples
    batches = samples // (batch_size * world_size)
    if batches < 1:
        raise ValueError(
            f"an epoch of {samples} samples is less than one batch of {batch_size} per rank on "
            f"{world_size} ranks"
        )
    return TrainLoader(
        loaded, batch_size, num_workers, seed, rank, world_size, transform, batches, shuffle_buffer
    )


class _EvalStream(IterableDataset):
    def __init__(self, urls: list[str], batch_size: int, rank: int, world_size: int, transform: Transform):
        super().__init__()
        self.urls, self.batch_size, self.rank, self.world_size = urls, batch_size, rank, world_size
        self.transform = transform

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = _worker()
        slots = self.world_size * workers
        slot = self.rank * workers + worker
        if len(self.urls) >= slots:
            raws: Iterator[RawSample] = (raw for url in self.urls[slot::slots] for raw in iter_shard(url))
        else:
            raws = (
                raw
                for i, raw in enumerate(r for url in self.urls for r in iter_shard(url))
                if i % slots == slot
            )
        samples: list[TransformedSample] = []
        for raw in raws:
            samples.append(_transformed(raw, self.transform, None))
            if len(samples) == self.batch_size:
                yield collate(samples)
                samples = []
        if samples:
            yield collate(samples)


def eval_loader(
    manifest: str | StreamSource,
    batch_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    transform: Transform,
) -> Iterable[Batch]:
    """A rank's share of an evaluation split: over all ranks and workers, every image exactly once.

    Raises:
        ManifestError: the manifest is missing, corrupt or of another schema version.
    """
    if batch_size < 1 or num_workers < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1, num_workers >= 0, 0 <= rank < world_size; got {batch_size}, "
            f"{num_workers}, {rank}, {world_size}"
        )
    source = _as_source(manifest)
    urls = shard_urls(load_manifest(source.manifest), source.shards)
    dataset = _EvalStream(urls, batch_size, rank, world_size, transform)
    if num_workers == 0:
        return dataset
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_passthrough,
        worker_init_fn=_init_worker,
    )
