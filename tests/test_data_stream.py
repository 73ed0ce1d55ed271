"""Training and evaluation streams: exact-once evaluation, equal training lengths, resume, mixing, URLs."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.data.config import DatasetConfig, DemoDataConfig, ShardConfig, ShardStageConfig
from pipeline.data.demo_dataset import make_demo_data
from pipeline.data.manifest import load_manifest
from pipeline.data.shard import run_shard
from pipeline.data.stream import StreamSource, eval_loader, train_loader
from pipeline.data.transforms import eval_transform, train_transform

SAMPLE_IDS = [30, 92, 143, 149, 326, 349, 359, 472, 536, 562, 590, 643]


def _eval_ids(manifest: str | StreamSource, ranks: int, workers: int) -> list[list[int]]:
    per_rank = []
    for rank in range(ranks):
        ids: list[int] = []
        for batch in eval_loader(manifest, 2, workers, rank, ranks, eval_transform(160, 256)):
            ids += batch.image_ids.tolist()
        per_rank.append(ids)
    return per_rank


@pytest.mark.parametrize("images_per_shard", [2, 12])
def test_eval_stream_every_image_once(
    ray_session, coco_sample: Path, tmp_path: Path, images_per_shard: int
) -> None:
    # 6 shards: dealt to the 4 rank x worker slots; 1 shard: every slot reads it and keeps its samples.
    cfg = ShardStageConfig(
        out=tmp_path,
        dataset=DatasetConfig(
            name="sample", images=coco_sample / "images", annotations=coco_sample / "instances.json"
        ),
        shard=ShardConfig(images_per_shard=images_per_shard),
    )
    manifest = str(run_shard(cfg).manifest_path)
    per_rank = _eval_ids(manifest, ranks=2, workers=2)
    union = per_rank[0] + per_rank[1]
    assert sorted(union) == SAMPLE_IDS and all(per_rank)


def test_eval_stream_over_http_and_pipe(coco_sample_shards: Path) -> None:
    root = coco_sample_shards.parents[2]
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        relative = coco_sample_shards.relative_to(root).as_posix()
        url = f"http://127.0.0.1:{server.server_address[1]}/{relative}"
        assert load_manifest(url).num_samples == 12
        per_rank = _eval_ids(url, ranks=2, workers=2)
        assert sorted(per_rank[0] + per_rank[1]) == SAMPLE_IDS
    finally:
        server.shutdown()
        server.server_close()
    piped = StreamSource(str(coco_sample_shards), shards=f"pipe:cat {coco_sample_shards.parent}/{{name}}")
    assert sorted(_eval_ids(piped, ranks=1, workers=0)[0]) == SAMPLE_IDS


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _train_run(manifest: str, rank: int, epoch: int, start_step: int = 0, workers: int = 2, seed: int = 7):
    loader = train_loader([(manifest, 1.0)], 2, workers, seed, rank, 2, train_transform(0.25))
    loader.set_epoch(epoch, start_step)
    return loader, [
        (b.image_ids.tolist(), b.image_sizes.tolist(), float(b.images.double().sum())) for b in loader
    ]


def test_train_stream_equal_lengths_reproducible_and_resumable(coco_sample_shards: Path) -> None:
    manifest = str(coco_sample_shards)
    loader0, rank0 = _train_run(manifest, rank=0, epoch=1)
    loader1, rank1 = _train_run(manifest, rank=1, epoch=1)
    assert loader0.batches_per_epoch == loader1.batches_per_epoch == 12 // (2 * 2)
    assert len(rank0) == len(rank1) == 3
    assert rank0 != rank1
    assert _train_run(manifest, rank=0, epoch=1)[1] == rank0  # same (seed, epoch, rank): same batches
    assert _train_run(manifest, rank=0, epoch=2)[1] != rank0  # another epoch: other batches
    for start in (1, 2):  # resume mid-epoch: exactly the uninterrupted run's remaining batches
        assert _train_run(manifest, rank=0, epoch=1, start_step=start)[1] == rank0[start:]
    assert _train_run(manifest, rank=0, epoch=1, start_step=3)[1] == []
    in_process = _train_run(manifest, rank=0, epoch=1, workers=0)[1]
    assert (
        len(in_process) == 3
        and in_process == _train_run(manifest, rank=0, epoch=1, start_step=0, workers=0)[1]
    )


def test_train_resume_skips_whole_shards_without_reading(
    coco_sample_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.data import stream

    manifest = str(coco_sample_shards)
    opened: list[str] = []
    original = stream.iter_shard

    def counting(url: str):
        opened.append(url)
        return original(url)

    loader = train_loader([(manifest, 1.0)], 1, 0, 3, 0, 1, eval_transform(64, 96), epoch_samples=80)
    loader.set_epoch(0)
    full = [b.image_ids.tolist() for b in loader]
    monkeypatch.setattr(stream, "iter_shard", counting)
    loader.set_epoch(0, start_step=70)
    tail = [b.image_ids.tolist() for b in loader]
    assert tail == full[70:]
    # The 10 samples left come from 5-6 two-image shard draws; the 70 skipped ones cost at most one read.
    assert len(opened) <= 7


def test_weighted_sources_mix(coco_sample_shards: Path, ray_session, tmp_path: Path) -> None:
    demo = make_demo_data(
        DemoDataConfig(
            out=tmp_path / "demo",
            pretrain_train=8,
            pretrain_val=1,
            finetune_train=1,
            finetune_val=1,
            min_size=64,
            max_size=96,
        )
    )
    split = demo.split("pretrain", "train")
    demo_manifest = run_shard(
        ShardStageConfig(
            out=tmp_path / "shards",
            dataset=DatasetConfig(name="demo", images=split.images, annotations=split.annotations),
            shard=ShardConfig(images_per_shard=2),
        )
    ).manifest_path
    loader = train_loader(
        [StreamSource(str(coco_sample_shards), 3.0), StreamSource(str(demo_manifest), 1.0)],
        4,
        0,
        0,
        0,
        1,
        eval_transform(64, 96),
        epoch_samples=800,
    )
    counts: Counter[str] = Counter()
    for batch in loader:
        for image_id in batch.image_ids.tolist():
            counts["coco" if image_id in SAMPLE_IDS else "demo"] += 1
    assert loader.batches_per_epoch == 200 and sum(counts.values()) == 800
    assert 0.69 < counts["coco"] / 800 < 0.81  # weight 3:1 -> 0.75 (binomial sd 0.015)


def test_batch_contract(coco_sample_shards: Path, coco_sample: Path) -> None:
    source = json.loads((coco_sample / "instances.json").read_text())
    images = {i["id"]: i for i in source["images"]}
    crowd = 0
    transform = eval_transform(200, 333)
    for batch in eval_loader(str(coco_sample_shards), 3, 0, 0, 1, transform):
        b, _, height, width = batch.images.shape
        assert batch.images.dtype == torch.float32 and batch.image_sizes.dtype == torch.int64
        assert batch.image_ids.dtype == torch.int64 and batch.orig_sizes.shape == (b, 2)
        assert batch.image_sizes[:, 0].max() == height and batch.image_sizes[:, 1].max() == width
        mask = batch.padding_mask()
        for i in range(b):
            h, w = batch.image_sizes[i].tolist()
            image = images[int(batch.image_ids[i])]
            assert batch.orig_sizes[i].tolist() == [image["height"], image["width"]]
            assert (h, w) == transform.output_size(image["height"], image["width"])
            assert min(h, w) == 200 or max(h, w) <= 333
            assert torch.all(batch.images[i, :, h:, :] == 0) and torch.all(batch.images[i, :, :, w:] == 0)
            assert not mask[i, :h, :w].any() and mask[i].sum() == height * width - h * w
            target = batch.targets[i]
            assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert target["iscrowd"].dtype == torch.bool
            assert torch.all((target["boxes"] >= 0) & (target["boxes"] <= 1))
            crowd += int(target["iscrowd"].sum())
    assert crowd == 2
