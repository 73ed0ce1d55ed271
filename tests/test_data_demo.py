"""The embedded demo dataset: deterministic, two label spaces, exact in-image boxes, all object sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.config import DemoDataConfig
from pipeline.data.demo_dataset import make_demo_data

SMALL = DemoDataConfig(pretrain_train=40, pretrain_val=8, finetune_train=20, finetune_val=8)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    cfg = DemoDataConfig(**{**SMALL.__dict__, "out": tmp_path_factory.mktemp("demo")})
    return make_demo_data(cfg)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "demo.json"
    }


def test_deterministic(demo, tmp_path: Path) -> None:
    again = make_demo_data(DemoDataConfig(**{**SMALL.__dict__, "out": tmp_path / "again"}))
    assert _files(demo.root) == _files(again.root)
    other = make_demo_data(DemoDataConfig(**{**SMALL.__dict__, "out": tmp_path / "other", "seed": 1}))
    assert _files(demo.root) != _files(other.root)
    # Regenerating into its own folder gives the same bytes; other settings there are refused, not merged.
    make_demo_data(DemoDataConfig(**{**SMALL.__dict__, "out": tmp_path / "again"}))
    assert _files(demo.root) == _files(again.root)
    with pytest.raises(FileExistsError, match="other settings \\(pretrain_train, seed\\)"):
        make_demo_data(
            DemoDataConfig(**{**SMALL.__dict__, "out": tmp_path / "again", "seed": 1, "pretrain_train": 4})
        )
    assert _files(demo.root) == _files(again.root)


def test_label_spaces_share_names_with_other_ids(demo) -> None:
    pre = json.loads(demo.split("pretrain", "train").annotations.read_text())["categories"]
    fine = json.loads(demo.split("finetune", "train").annotations.read_text())["categories"]
    pre_ids = {c["name"]: c["id"] for c in pre}
    fine_ids = {c["name"]: c["id"] for c in fine}
    shared = set(pre_ids) & set(fine_ids)
    assert len(pre) > len(fine) >= 4 and 2 <= len(shared) < len(fine)
    assert any(pre_ids[name] != fine_ids[name] for name in shared)
    assert {c["id"] for c in pre} & {c["id"] for c in fine}  # same ids, other meanings: remap by name


def test_splits_boxes_and_sizes(demo) -> None:
    seen_ids: set[int] = set()
    areas = []
    for key, split in demo.splits.items():
        coco = json.loads(split.annotations.read_text())
        assert len(coco["images"]) == split.num_images == getattr(SMALL, key.replace("/", "_"))
        ids = {image["id"] for image in coco["images"]}
        assert not ids & seen_ids
        seen_ids |= ids
        categories = {c["id"] for c in coco["categories"]}
        images = {image["id"]: image for image in coco["images"]}
        per_image = {i: 0 for i in ids}
        for ann in coco["annotations"]:
            image = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert ann["category_id"] in categories and ann["iscrowd"] == 0
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            assert ann["area"] == w * h
            per_image[ann["image_id"]] += 1
            areas.append(w * h)
        assert min(per_image.values()) >= 1 and max(per_image.values()) <= SMALL.max_objects
        for image in coco["images"][:3]:
            with Image.open(split.images / image["file_name"]) as im:
                assert im.size == (image["width"], image["height"]) and im.format == "JPEG"
                assert SMALL.min_size <= min(im.size) and max(im.size) <= SMALL.max_size
    areas_np = np.array(areas)
    assert (
        (areas_np < 32**2).any()
        and ((areas_np >= 32**2) & (areas_np < 96**2)).any()
        and (areas_np >= 96**2).any()
    )


def test_boxes_are_tight(demo) -> None:
    # Each shape touches all four sides of its box: its saturated colour appears in the box's outer rows and
    # columns, not just inside (JPEG blurs a pixel or two, so look one pixel in).
    split = demo.split("pretrain", "train")
    coco = json.loads(split.annotations.read_text())
    images = {image["id"]: image for image in coco["images"]}
    checked = 0
    for ann in coco["annotations"][:40]:
        x, y, w, h = ann["bbox"]
        if min(w, h) < 20:
            continue
        with Image.open(split.images / images[ann["image_id"]]["file_name"]) as im:
            hsv = np.asarray(im.convert("HSV")).astype(np.int32)
        saturation = hsv[y : y + h, x : x + w, 1]
        strong = saturation > 120
        assert strong[1].any() and strong[-2].any() and strong[:, 1].any() and strong[:, -2].any()
        checked += 1
    assert checked >= 10
