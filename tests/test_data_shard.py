"""The shard stage: COCO round trip, Objects365 faults, rejects, bad annotation files, manifests, verify."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import partition
from pipeline.data import shard as shard_stage
from pipeline.data.coco_source import AnnotationFileError, ImageColumns, is_safe_file_name, safe_file_names
from pipeline.data.config import DatasetConfig, ShardConfig, ShardStageConfig
from pipeline.data.manifest import ManifestError, load_manifest
from pipeline.data.partition import _gather_names
from pipeline.data.rejects import RejectFractionExceeded
from pipeline.data.shard import run_shard, superseded_split, verify_shards
from pipeline.data.shard_writer import _member_header
from pipeline.data.stream import iter_shard


def _coco_cfg(out: Path, coco_sample: Path, **shard: object) -> ShardStageConfig:
    return ShardStageConfig(
        out=out,
        dataset=DatasetConfig(
            kind="coco_format",
            name="sample",
            images=coco_sample / "images",
            annotations=coco_sample / "instances.json",
        ),
        shard=ShardConfig(**shard),  # type: ignore[arg-type]
    )


def _read_split(manifest_path: Path) -> dict[str, dict]:
    manifest = load_manifest(manifest_path)
    samples: dict[str, dict] = {}
    for url in manifest.shard_locations():
        for raw in iter_shard(url):
            assert raw["__key__"] not in samples, f"duplicate sample {raw['__key__']}"
            samples[raw["__key__"]] = raw
    return samples


def test_coco_sample_round_trip(coco_sample_shards: Path, coco_sample: Path) -> None:
    source = json.loads((coco_sample / "instances.json").read_text())
    samples = _read_split(coco_sample_shards)
    assert sorted(samples) == sorted(f"{image['id']:012d}" for image in source["images"])
    by_image: dict[int, list[dict]] = {}
    for ann in source["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    crowd = 0
    for image in source["images"]:
        raw = samples[f"{image['id']:012d}"]
        file_bytes = (coco_sample / "images" / image["file_name"]).read_bytes()
        assert hashlib.sha256(raw["jpg"]).digest() == hashlib.sha256(file_bytes).digest()
        record = json.loads(raw["json"])
        assert (record["id"], record["file_name"], record["width"], record["height"]) == (
            image["id"],
            image["file_name"],
            image["width"],
            image["height"],
        )
        assert record["annotations"] == by_image.get(image["id"], [])
        crowd += sum(a["iscrowd"] for a in record["annotations"])
    assert crowd == 2
    manifest = load_manifest(coco_sample_shards)
    assert manifest.num_samples == 12 and manifest.num_annotations == 84
    assert len(manifest.shards) == 6 and [s.num_samples for s in manifest.shards] == [2] * 6
    assert manifest.rejects == [] and manifest.reject_counts == {}
    assert {c.id: c.name for c in manifest.categories}[1] == "person"
    assert (
        manifest.annotation_files[0].sha256
        == hashlib.sha256((coco_sample / "instances.json").read_bytes()).hexdigest()
    )
    report = verify_shards(coco_sample_shards)
    assert report.ok and report.samples == 12 and report.shards_checked == 6


def test_shards_are_the_tars_tarfile_writes(coco_sample_shards: Path) -> None:
    """Our hand-built member headers and padding give the bytes of Python's ``tarfile`` (USTAR, fixed
    mtime, mode and owner) for the same members."""
    manifest = load_manifest(coco_sample_shards)
    for entry in manifest.shards:
        data = (coco_sample_shards.parent / entry.name).read_bytes()
        rebuilt = io.BytesIO()
        with (
            tarfile.open(fileobj=io.BytesIO(data)) as source,
            tarfile.open(fileobj=rebuilt, mode="w", format=tarfile.USTAR_FORMAT) as copy,
        ):
            for member in source.getmembers():
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime, info.mode = member.size, 0, 0o444
                info.uname = info.gname = "dino"
                copy.addfile(info, source.extractfile(member))
        assert rebuilt.getvalue() == data, entry.name


@pytest.mark.parametrize("name", ["a.jpg", "000000000139.json", "é/ü.png", "n" * 100, "dir/" * 26 + "x.jpg"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 8**11 - 1])
def test_member_header_is_tarfiles(name: str, size: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uname = info.gname = "dino"
    expected = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    assert _member_header(name, size) == expected


def test_rerun_over_finished_output_does_nothing(
    coco_sample_shards: Path, coco_sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = coco_sample_shards.read_bytes()
    mtimes = {p: p.stat().st_mtime_ns for p in coco_sample_shards.parent.iterdir()}
    summary = run_shard(_coco_cfg(coco_sample_shards.parents[2], coco_sample, images_per_shard=2))
    assert summary.already_complete and summary.shards_written == 0
    assert "nothing to do" in capsys.readouterr().out
    assert coco_sample_shards.read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in coco_sample_shards.parent.iterdir()} == mtimes


def test_new_split_reads_its_annotations_once_and_a_rerun_compares_their_hashes(
    ray_session, coco_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hashed: list[Path] = []
    real_sha256_file = shard_stage.sha256_file
    monkeypatch.setattr(
        shard_stage, "sha256_file", lambda path: hashed.append(path) or real_sha256_file(path)
    )
    cfg = _coco_cfg(tmp_path / "out", coco_sample, images_per_shard=5)
    first = run_shard(cfg)
    assert not first.already_complete and hashed == []  # the indexing pass hashed it
    recorded = load_manifest(first.manifest_path).annotation_files
    assert [a.sha256 for a in recorded] == [real_sha256_file(coco_sample / "instances.json")]
    assert run_shard(cfg).already_complete and hashed == [coco_sample / "instances.json"]


def test_other_settings_over_finished_output_fail(coco_sample_shards: Path, coco_sample: Path) -> None:
    with pytest.raises(Exception, match="other input or settings"):
        run_shard(_coco_cfg(coco_sample_shards.parents[2], coco_sample, images_per_shard=3))


def test_superseded_split_is_a_finished_split_of_other_input_or_settings(
    coco_sample_shards: Path, coco_sample: Path, tmp_path: Path
) -> None:
    out = coco_sample_shards.parents[2]
    assert not superseded_split(_coco_cfg(out, coco_sample, images_per_shard=2))
    assert superseded_split(_coco_cfg(out, coco_sample, images_per_shard=3))
    assert superseded_split(_coco_cfg(out, coco_sample, images_per_shard=2, decode_check="draft"))
    edited = tmp_path / "instances.json"  # the same settings over other annotations
    edited.write_text((coco_sample / "instances.json").read_text() + "\n")
    cfg = _coco_cfg(out, coco_sample, images_per_shard=2)
    assert superseded_split(
        dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, annotations=edited))
    )
    assert not superseded_split(_coco_cfg(tmp_path / "empty", coco_sample, images_per_shard=2))


def test_verify_finds_a_corrupt_shard(coco_sample_shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "split"
    shutil.copytree(coco_sample_shards.parent, copy)
    victim = copy / load_manifest(coco_sample_shards).shards[3].name
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF
    victim.write_bytes(bytes(data))
    report = verify_shards(copy / "manifest.json")
    assert not report.ok and len(report.problems) == 1 and victim.name in report.problems[0]


def test_sample_json_holds_each_annotation_as_its_source_bytes(ray_session, tmp_path: Path) -> None:
    """Whitespace between the source's elements (here json.dumps's ", ") is not part of an annotation."""
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(_jpeg(64, 48, 1))
    anns = [
        {"id": 1, "image_id": 5, "category_id": 1, "bbox": [1, 2, 3, 4]},
        {"id": 2, "image_id": 5, "category_id": 1, "bbox": [5.5, 6, 7, 8], "iscrowd": 1},
    ]
    source = {
        "images": [{"id": 5, "file_name": "a.jpg", "width": 64, "height": 48}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(source) + "\n")
    summary = run_shard(_coco_cfg(tmp_path / "out", tmp_path))
    (sample,) = _read_split(summary.manifest_path).values()
    head = b'{"id":5,"file_name":"a.jpg","width":64,"height":48,"annotations":['
    assert sample["json"] == head + b",".join(json.dumps(a).encode() for a in anns) + b"]}"


def test_target_bytes_partition(ray_session, coco_sample: Path, tmp_path: Path) -> None:
    target_mb = 0.2
    summary = run_shard(_coco_cfg(tmp_path, coco_sample, target_shard_mb=target_mb))
    manifest = load_manifest(summary.manifest_path)
    sizes = {
        f"{i['id']:012d}": (coco_sample / "images" / i["file_name"]).stat().st_size
        for i in json.loads((coco_sample / "instances.json").read_text())["images"]
    }
    keys = sorted(sizes)
    cut, position = [], 0
    for shard in manifest.shards:
        members = keys[position : position + shard.num_samples]
        position += shard.num_samples
        cut.append(sum(sizes[k] for k in members))
        assert len(members) == 1 or cut[-1] <= target_mb * 2**20
    assert position == 12 and len(manifest.shards) > 1
    # Greedy: no shard could have taken the next shard's first image.
    for shard_bytes, nxt in zip(cut, np.cumsum([0] + [s.num_samples for s in manifest.shards])[1:-1]):
        assert shard_bytes + sizes[keys[nxt]] > target_mb * 2**20


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_o365_fixture(root: Path) -> None:
    """An Objects365-layout dataset carrying each known fault (see the expectations in the tests)."""

    def image(image_id: int, version: int = 1, patch: int = 0, w: int = 64, h: int = 48) -> dict:
        return {
            "id": image_id,
            "width": w,
            "height": h,
            "file_name": f"images/v{version}/patch{patch}/objects365_v{version}_{image_id:08d}.jpg",
        }

    def write(record: dict, data: bytes) -> None:
        path = root / record["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def ann(ann_id: int, image_id: int, bbox: list, cat: int = 1, **extra: object) -> dict:
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": cat,
            "bbox": bbox,
            "area": bbox[2] * bbox[3] if all(np.isfinite(bbox)) else 0.0,
            "iscrowd": 0,
            "isfake": 0,
            "isreflected": 0,
            **extra,
        }

    categories = [{"id": 1, "name": "person"}, {"id": 2, "name": "sneakers"}, {"id": 3, "name": "chair"}]
    train_images = [image(101), image(102), image(103), image(104), image(106, 2, 1), image(107)]
    for record in (train_images[0], train_images[4]):
        write(record, _jpeg(64, 48, record["id"]))
    write(train_images[2], _jpeg(64, 48, 103)[:300])  # truncated
    write(
        train_images[3], bytes(np.random.default_rng(4).integers(0, 255, 900, dtype=np.uint8))
    )  # not an image
    write(train_images[5], _jpeg(32, 32, 107))  # the record says 64x48
    unsafe = {"id": 105, "width": 64, "height": 48, "file_name": "../../outside.jpg"}
    train_annotations = [
        ann(1, 101, [5.0, 5.0, 10.0, 10.0], isreflected=1),
        ann(2, 101, [5.0, 5.0, 10.0, 10.0], isreflected=1),  # exact duplicate of 1
        ann(3, 101, [50.0, 30.0, 30.0, 30.0], cat=2, isfake=1),  # clipped to 14 x 18
        ann(4, 101, [10.0, 10.0, 0.0, 5.0]),  # zero area
        ann(5, 101, [70.0, 10.0, 5.0, 5.0]),  # wholly outside: no area once clipped
        ann(6, 101, [1.0, 1.0, 5.0, 5.0], cat=999),  # unknown category
        ann(7, 101, [float("nan"), 1.0, 5.0, 5.0]),  # non-finite
        ann(8, 106, [0.0, 0.0, 64.0, 48.0], cat=3),
        ann(9, 106, [2.0, 2.0, 20.0, 20.0], iscrowd=1),
        ann(10, 999, [1.0, 1.0, 5.0, 5.0]),  # unknown image
        ann(11, 102, [1.0, 1.0, 5.0, 5.0]),  # image missing: goes with the image
        ann(12, 101, [1.0, 1.0, 5.0, 5.0], note="BAD_LITERAL"),  # balanced but not JSON
        # Routed by the nested image_id (the first in its text), read as image 101's: in no shard of 106.
        {"id": 13, "meta": {"image_id": 106}, **ann(13, 101, [1.0, 1.0, 5.0, 5.0])},
    ]
    train = {
        "images": [*train_images[:4], unsafe, *train_images[4:]],
        "annotations": train_annotations,
        "categories": categories,
    }
    # Val images in file order 203, 201, 204, 202: the holdout takes the lowest ids, 201 and 202. Listed
    # again: 201 (a repeat in val) and 204 (a repeat in train, which takes it).
    val_images = [image(i, 2, 3) for i in (203, 201, 204, 202)]
    for record in val_images:
        write(record, _jpeg(64, 48, record["id"]))
    val = {
        "images": [*val_images, image(204, 2, 3), image(201, 2, 3)],
        "annotations": [ann(20 + i, i, [1.0, 2.0, 3.0, 4.0]) for i in (201, 202, 203, 204)],
        "categories": categories,
    }
    text = json.dumps(train).replace('"BAD_LITERAL"', "tru")  # NaN stays the NaN literal
    (root / "zhiyuan_objv2_train.json").write_text(text)
    (root / "zhiyuan_objv2_val.json").write_text(json.dumps(val))


def _o365_cfg(root: Path, out: Path, split: str, max_reject_fraction: float) -> ShardStageConfig:
    return ShardStageConfig(
        out=out,
        dataset=DatasetConfig(kind="o365", root=root, split=split, o365_val_holdout=2),
        shard=ShardConfig(images_per_shard=3, max_reject_fraction=max_reject_fraction),
    )


def test_objects365_faults(ray_session, tmp_path: Path) -> None:
    root = tmp_path / "o365"
    make_o365_fixture(root)
    summary = run_shard(_o365_cfg(root, tmp_path / "out", "train", 1.0))
    manifest = load_manifest(summary.manifest_path)
    assert summary.manifest_path == tmp_path / "out" / "o365" / "train" / "manifest.json"
    got = {(r.image_id, r.annotation_id, r.reason) for r in manifest.rejects}
    assert got == {
        (101, 2, "duplicate_annotation"),
        (101, 4, "zero_area_box"),
        (101, 5, "zero_area_box"),
        (101, 6, "unknown_category"),
        (101, 7, "non_finite_box"),
        (101, None, "malformed_annotation"),
        (106, 13, "malformed_annotation"),
        (102, None, "missing_image"),
        (103, None, "undecodable_image"),
        (104, None, "undecodable_image"),
        (105, None, "unsafe_file_name"),
        (107, None, "size_mismatch"),
        (204, None, "duplicate_image_id"),
        (999, 10, "unknown_image"),
    }
    assert len(manifest.rejects) == len(got)
    assert manifest.reject_counts == {
        "box_clipped": 1,
        "duplicate_annotation": 1,
        "duplicate_image_id": 1,
        "malformed_annotation": 2,
        "missing_image": 1,
        "non_finite_box": 1,
        "size_mismatch": 1,
        "undecodable_image": 2,
        "unknown_category": 1,
        "unknown_image": 1,
        "unsafe_file_name": 1,
        "zero_area_box": 2,
    }
    samples = {int(k): json.loads(raw["json"]) for k, raw in _read_split(summary.manifest_path).items()}
    assert sorted(samples) == [101, 106, 203, 204]
    kept_101 = samples[101]["annotations"]
    assert [a["id"] for a in kept_101] == [1, 3]
    assert kept_101[0]["bbox"] == [5.0, 5.0, 10.0, 10.0] and kept_101[0]["isreflected"] == 1
    assert kept_101[1]["bbox"] == [50.0, 30.0, 14.0, 18.0] and kept_101[1]["area"] == 14.0 * 18.0
    assert kept_101[1]["isfake"] == 1 and "isreflected" in kept_101[1]
    assert [(a["id"], a["iscrowd"]) for a in samples[106]["annotations"]] == [(8, 0), (9, 1)]
    assert samples[106]["file_name"] == "images/v2/patch1/objects365_v2_00000106.jpg"
    assert manifest.num_annotations == 2 + 2 + 1 + 1
    assert [a.path for a in manifest.annotation_files] == [
        str(root / "zhiyuan_objv2_train.json"),
        str(root / "zhiyuan_objv2_val.json"),
    ]

    # Train lists 7 images from its file and 3 from val's (203, 204 and 204 again); 6 are rejected.
    assert (summary.rejects.images_listed, summary.rejects.images_rejected) == (10, 6)

    val = run_shard(_o365_cfg(root, tmp_path / "out", "val", 1.0))
    val_samples = _read_split(val.manifest_path)
    assert sorted(int(k) for k in val_samples) == [201, 202]
    assert [(r.image_id, r.reason) for r in load_manifest(val.manifest_path).rejects] == [
        (201, "duplicate_image_id")
    ]
    assert (val.rejects.images_listed, val.rejects.images_rejected) == (3, 1)


def test_reject_fraction_fails_with_summary(ray_session, tmp_path: Path) -> None:
    root = tmp_path / "o365"
    make_o365_fixture(root)
    cfg = _o365_cfg(root, tmp_path / "out", "train", 0.2)
    with pytest.raises(RejectFractionExceeded) as failure:
        run_shard(cfg)
    text = str(failure.value)
    assert "max_reject_fraction=0.2" in text and "rejected 6 of 10 images" in text
    assert "missing_image: 1" in text and "undecodable_image: 2" in text
    assert not (cfg.split_dir / "manifest.json").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2, 3]", "top level must be an object"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}], "annotations": [',
            "not valid JSON",
        ),
        (
            '{"images": [{"id": "one", "file_name": "a.jpg"}], "annotations": [], "categories": []}',
            r"images\[0\] is not a COCO image record",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg", "width": 0, "height": 4}], "categories": []}',
            r"images\[0\] is not a COCO image record",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}, '
            '{"id": 123456789012345678901, "file_name": "b.jpg", "width": 4, "height": 4}]}',
            r"images\[1\] is not a COCO image record \(needs an integer 'id'",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4} 2]}',
            "not valid JSON \\('images' holds values that are not objects",
        ),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4} 2, '
            '{"id": 2, "file_name": "b.jpg", "width": 4, "height": 4}]}',
            "'images' is not valid JSON",
        ),
        ('{"images": [7], "annotations": []}', "'images' holds values that are not objects"),
        ('{"info": {}, "annotations": []}', "no images"),
        (
            '{"images": [{"id": 1, "file_name": "a.jpg", "width": 4, "height": 4}], "annotations": []}',
            "no categories",
        ),
    ],
)
def test_not_coco_json_fails_at_once_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text)
    cfg = ShardStageConfig(
        out=tmp_path / "out",
        dataset=DatasetConfig(images=tmp_path, annotations=path),
        shard=ShardConfig(images_per_shard=1),
    )
    with pytest.raises(AnnotationFileError, match=message) as failure:
        run_shard(cfg)
    assert str(path) in str(failure.value)
    assert not (cfg.split_dir / "manifest.json").exists()


def test_missing_inputs_fail_before_work(tmp_path: Path) -> None:
    cfg = ShardStageConfig(
        out=tmp_path, dataset=DatasetConfig(images=tmp_path, annotations=tmp_path / "no.json")
    )
    with pytest.raises(AnnotationFileError, match="annotation file not found"):
        run_shard(cfg)


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: ShardConfig(images_per_shard=0), "shard.images_per_shard"),
        (lambda: ShardConfig(max_reject_fraction=1.5), "shard.max_reject_fraction"),
        (lambda: ShardConfig(decode_check="maybe"), "shard.decode_check"),
        (lambda: DatasetConfig(kind="voc"), "dataset.kind"),
        (lambda: DatasetConfig(kind="coco", split="test"), "dataset.split"),
        (lambda: ShardStageConfig(dataset=DatasetConfig(kind="coco_format")), "dataset.images"),
        (lambda: ShardStageConfig(dataset=DatasetConfig(kind="o365")), "dataset.root"),
    ],
)
def test_config_errors_name_the_key(build, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build()


def test_load_manifest_errors(coco_sample_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest here"):
        load_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt manifest"):
        load_manifest(tmp_path)
    data = json.loads(coco_sample_shards.read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "schema_version": 99}))
    with pytest.raises(ManifestError, match="schema version 99"):
        load_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text(json.dumps({**data, "num_samples": 13}))
    with pytest.raises(ManifestError, match="differs from the sum"):
        load_manifest(tmp_path / "manifest.json")
    del data["shards"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="malformed manifest"):
        load_manifest(tmp_path / "manifest.json")


def test_cli_configs_compose_and_validate(tmp_path: Path) -> None:
    from pipeline.config import compose, validate
    from pipeline.data.config import DemoDataConfig

    cfg = validate(
        compose(
            "shard",
            [
                "dataset=coco_format",
                f"dataset.images={tmp_path}",
                f"dataset.annotations={tmp_path / 'a.json'}",
                f"out={tmp_path}",
                "shard.images_per_shard=7",
            ],
        )
    )
    assert isinstance(cfg, ShardStageConfig) and cfg.shard.images_per_shard == 7
    assert cfg.split_dir == tmp_path / "coco_format" / "train" and isinstance(cfg.dataset.images, Path)
    o365 = validate(compose("shard", ["dataset=o365", f"dataset.root={tmp_path}", "dataset.split=val"]))
    assert (
        o365.dataset.kind == "o365"
        and o365.dataset.o365_val_holdout == 5000
        and o365.shard.images_per_shard is None
    )
    demo = validate(compose("shard", ["dataset=demo_pretrain", "dataset.split=val"]))
    assert str(demo.dataset.annotations).endswith("pretrain/annotations/instances_val.json")
    assert isinstance(validate(compose("make-demo-data", [f"out={tmp_path}"])), DemoDataConfig)
    with pytest.raises(ValueError, match=r"shard\.images_per_shard"):
        validate(
            compose(
                "shard",
                [f"dataset.images={tmp_path}", f"dataset.annotations={tmp_path}", "shard.images_per_shard=0"],
            )
        )


def _columns(names: list[str]) -> ImageColumns:
    encoded = [name.encode() for name in names]
    offsets = np.concatenate(([0], np.cumsum([len(e) for e in encoded]))).astype(np.int64)
    zeros = np.zeros(len(names), dtype=np.int64)
    return ImageColumns(zeros, zeros.astype(np.int32), zeros.astype(np.int32), offsets, b"".join(encoded))


@pytest.mark.parametrize(
    "names",
    [
        ["a.jpg", "images/v1/patch0/x.jpg", "/etc/passwd", "~root/x", "", ".", "./a.jpg", "b/./c.jpg"],
        ["a.jpg", "../a.jpg", "a/../../b.jpg", "a/../b.jpg", "..", "x..y.jpg", "", "/abs.jpg"],
        ["a.jpg", "nul\x00.jpg", "~x"],
        ["", ""],
    ],
)
def test_safe_file_names_agree_with_the_one_name_check(names: list[str]) -> None:
    columns = _columns(names)
    positions = np.arange(len(names))[::-1].copy()
    expected = [is_safe_file_name(names[i]) for i in positions]
    assert safe_file_names(columns, positions).tolist() == expected


def test_gather_names_of_two_sources_in_merged_order() -> None:
    rng = np.random.default_rng(0)
    sources = [[f"s{s}/{'x' * int(rng.integers(0, 5))}{i}.jpg" for i in range(30)] for s in range(2)]
    src = rng.integers(0, 2, 50).astype(np.int16)
    pos = rng.integers(0, 30, 50)
    expected = [sources[s][p] for s, p in zip(src.tolist(), pos.tolist())]
    for block in (1, 3, 64):
        names, offsets = _gather_names([_columns(n) for n in sources], src, pos, block)
        assert [names[a:b].decode() for a, b in itertools.pairwise(offsets.tolist())] == expected


@pytest.mark.parametrize("read_size", [1, 5, 64, 1 << 20])
@pytest.mark.parametrize("max_lines", [1, 2, 100])
def test_spill_blocks_cut_whole_lines_at_any_read_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int, max_lines: int
) -> None:
    lines = [b'{"id":%d,"pad":"%s"}' % (i, b"x" * (i * 7 % 23)) for i in range(17)]
    ids = np.arange(17, dtype=np.int64) * 3 - 5
    spill = (tmp_path / "spill.jsonl", tmp_path / "spill.ids")
    spill[0].write_bytes(b"".join(line + b"\n" for line in lines))
    spill[1].write_bytes(ids.tobytes())
    monkeypatch.setattr(partition, "_SPILL_READ", read_size)
    blocks = list(partition._spill_blocks(spill, max_lines))
    assert all(0 < len(block_lines) <= max_lines for block_lines, _ in blocks)
    assert [line for block_lines, _ in blocks for line in block_lines] == lines
    assert np.concatenate([block_ids for _, block_ids in blocks]).tolist() == ids.tolist()
    assert all(len(block_lines) == len(block_ids) for block_lines, block_ids in blocks)


def test_check_local_shards_names_missing_and_truncated_shards(
    coco_sample_shards: Path, tmp_path: Path
) -> None:
    split = tmp_path / "split"
    shutil.copytree(coco_sample_shards.parent, split)
    load_manifest(split / "manifest.json").check_local_shards()
    first, second = sorted(split.glob("*.tar"))[:2]
    first.unlink()
    second.write_bytes(second.read_bytes()[:1000])
    with pytest.raises(
        ManifestError, match=rf"2 shard\(s\) missing or incomplete: {first.name} \(missing\), "
    ):
        load_manifest(split / "manifest.json").check_local_shards()


def test_cli_errors_are_messages_not_tracebacks(tmp_path: Path) -> None:
    """out= a file, and verify=true where there is no manifest: one line naming the input, no traceback."""
    afile = tmp_path / "afile.txt"
    afile.write_text("keep me")
    common = [sys.executable, "-m", "pipeline", "shard", "dataset=demo_pretrain"]
    for extra, code, message in [
        ([f"out={afile}"], 2, f"out={afile} is a file; out= takes a directory"),
        ([f"out={tmp_path / 'none'}", "verify=true"], 1, "no manifest here"),
    ]:
        result = subprocess.run([*common, *extra], capture_output=True, text=True)
        assert result.returncode == code and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
    assert afile.read_text() == "keep me"
