"""The embedded dataset: a small, learnable detection dataset of coloured shapes, in COCO format.

``make_demo_data`` writes, deterministically from a seed::

    <out>/pretrain/{train,val}/*.jpg   <out>/pretrain/annotations/instances_{train,val}.json
    <out>/finetune/{train,val}/*.jpg   <out>/finetune/annotations/instances_{train,val}.json
    <out>/demo.json                    (what was generated: classes, counts, paths)

Two label spaces: "pretrain" (9 shape x colour classes) and "finetune" (5 classes: three shared with
pretrain by name, two new), whose category ids differ (id 1 is "red circle" in one and "purple star" in
the other), so pretraining -> fine-tuning must remap the class head by name. Images are 256-384 px on
textured backgrounds (gradient, noise, faint stripes, low saturation); 1-6 opaque, saturated, non-overlapping
shapes each, whose boxes are exact (every shape touches all four sides of its box). Object sizes are drawn
from three bands so COCO's small (< 32^2), medium and large (> 96^2) areas all occur; ``area`` is the
box area. Generation of the default sizes takes a few seconds.
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.config import DemoDataConfig

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
}
PRETRAIN_CLASSES = [
    (1, "red circle"),
    (2, "green circle"),
    (3, "blue square"),
    (4, "yellow square"),
    (5, "red triangle"),
    (6, "blue triangle"),
    (7, "green ring"),
    (8, "yellow cross"),
    (9, "blue diamond"),
]
FINETUNE_CLASSES = [
    (1, "purple star"),
    (2, "blue square"),
    (3, "red circle"),
    (4, "orange ring"),
    (5, "red triangle"),
]
SIZE_BANDS = ((12, 30), (34, 90), (100, 170))
"""Box side ranges in pixels: small, medium and large objects in COCO's area terms."""


@dataclass(frozen=True)
class DemoSplit:
    """One generated split: its image folder and COCO JSON."""

    images: Path
    annotations: Path
    num_images: int
    num_annotations: int


@dataclass(frozen=True)
class DemoDataset:
    """What ``make_demo_data`` wrote; ``splits`` keys are ``"<space>/<split>"``, e.g. ``"pretrain/train"``."""

    root: Path
    splits: dict[str, DemoSplit]

    def split(self, space: str, split: str) -> DemoSplit:
        """The split ``split`` (``train``/``val``) of label space ``space`` (``pretrain``/``finetune``)."""
        return self.splits[f"{space}/{split}"]


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    f32 = np.float32
    y = np.linspace(0, 1, height, dtype=f32)[:, None]
    x = np.linspace(0, 1, width, dtype=f32)[None, :]
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 24)
    phase = (f32(math.cos(angle)) * x + f32(math.sin(angle)) * y) * f32(width / period * 2 * math.pi)
    grey = f32(rng.uniform(-35, 35)) * x + f32(rng.uniform(-35, 35)) * y
    grey = grey + f32(rng.uniform(0, 10)) * np.sin(phase) + f32(rng.uniform(90, 190))
    grey += (rng.random((height, width), dtype=f32) - f32(0.5)) * f32(rng.uniform(12, 40))
    tint = rng.uniform(-18, 18, size=3).astype(f32)
    image = grey[:, :, None] + tint + rng.random((height, width, 3), dtype=f32) * f32(10)
    return np.clip(image, 0, 255, out=image).astype(np.uint8)


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour: tuple[int, ...]
) -> None:
    """Draw ``shape`` filling ``box`` = (x0, y0, x1, y1) inclusive pixels, touching all four sides."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, round(min(w, h) * 0.18)))
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif shape == "cross":
        tw, th = max(1, round(w * 0.17)), max(1, round(h * 0.17))
        draw.rectangle((x0, round(cy) - th, x1, round(cy) + th), fill=colour)
        draw.rectangle((round(cx) - tw, y0, round(cx) + tw, y1), fill=colour)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            points.append((math.cos(a) * radius, math.sin(a) * radius))
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
        draw.polygon(
            [
                (x0 + (px - lo_x) / (hi_x - lo_x) * w, y0 + (py - lo_y) / (hi_y - lo_y) * h)
                for px, py in points
            ],
            fill=colour,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _place(
    rng: np.random.Generator, width: int, height: int, taken: list[tuple[int, int, int, int]]
) -> tuple[int, int, int, int] | None:
    bands = [band for band in SIZE_BANDS if band[0] <= min(width, height) - 2]
    band = bands[int(rng.integers(len(bands)))]
    for _ in range(30):
        side = int(rng.integers(band[0], min(band[1], width - 2, height - 2) + 1))
        aspect = rng.uniform(0.75, 1.33)
        w = max(band[0], min(width - 2, round(side * math.sqrt(aspect))))
        h = max(band[0], min(height - 2, round(side / math.sqrt(aspect))))
        x0 = int(rng.integers(0, width - w + 1))
        y0 = int(rng.integers(0, height - h + 1))
        box = (x0, y0, x0 + w - 1, y0 + h - 1)
        margin = 2
        if all(
            box[2] + margin < t[0]
            or t[2] + margin < box[0]
            or box[3] + margin < t[1]
            or t[3] + margin < box[1]
            for t in taken
        ):
            return box
    return None


def _generate_split(
    cfg: DemoDataConfig,
    rng: np.random.Generator,
    classes: list[tuple[int, str]],
    count: int,
    first_id: int,
    images_dir: Path,
    annotations_path: Path,
) -> DemoSplit:
    images_dir.mkdir(parents=True, exist_ok=True)
    annotations_path.parent.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for index in range(count):
        image_id = first_id + index
        width = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        height = int(rng.integers(cfg.min_size, cfg.max_size + 1))
        canvas = Image.fromarray(_background(rng, height, width))
        draw = ImageDraw.Draw(canvas)
        taken: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(1, cfg.max_objects + 1))):
            box = _place(rng, width, height, taken)
            if box is None:
                continue
            taken.append(box)
            category_id, name = classes[int(rng.integers(len(classes)))]
            colour_name, shape = name.split()
            colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour_name])
            _draw(draw, shape, box, colour)
            w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        file_name = f"{image_id:06d}.jpg"
        buffer = io.BytesIO()
        canvas.save(buffer, format="JPEG", quality=cfg.jpeg_quality)
        (images_dir / file_name).write_bytes(buffer.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    coco = {
        "info": {"description": "pipeline embedded demo dataset (coloured shapes)", "seed": cfg.seed},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": name.split()[1]} for cid, name in classes],
    }
    annotations_path.write_text(json.dumps(coco), encoding="utf-8")
    return DemoSplit(images_dir, annotations_path, len(images), len(annotations))


def make_demo_data(cfg: DemoDataConfig) -> DemoDataset:
    """Generate the embedded dataset under ``cfg.out`` (same seed and sizes -> same bytes).

    Raises:
        FileExistsError: ``cfg.out`` holds a demo dataset made with other settings (never overwritten).
    """
    root = Path(cfg.out)
    config = {k: str(v) for k, v in asdict(cfg).items()}
    try:
        previous = json.loads((root / "demo.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        previous = None
    if previous is not None and previous != config:
        changed = sorted(k for k in config if previous.get(k) != config[k])
        raise FileExistsError(
            f"out={root} holds a demo dataset made with other settings ({', '.join(changed)}); "
            "give another out= or remove it"
        )
    plan = [
        ("pretrain", "train", cfg.pretrain_train, PRETRAIN_CLASSES),
        ("pretrain", "val", cfg.pretrain_val, PRETRAIN_CLASSES),
        ("finetune", "train", cfg.finetune_train, FINETUNE_CLASSES),
        ("finetune", "val", cfg.finetune_val, FINETUNE_CLASSES),
    ]
    splits: dict[str, DemoSplit] = {}
    first_id = 1
    for number, (space, split, count, classes) in enumerate(plan):
        rng = np.random.default_rng([cfg.seed, number])
        splits[f"{space}/{split}"] = _generate_split(
            cfg,
            rng,
            classes,
            count,
            first_id,
            root / space / split,
            root / space / "annotations" / f"instances_{split}.json",
        )
        first_id += count
    dataset = DemoDataset(root, splits)
    summary = {
        "config": config,
        "classes": {"pretrain": PRETRAIN_CLASSES, "finetune": FINETUNE_CLASSES},
        "splits": {key: {k: str(v) for k, v in asdict(value).items()} for key, value in splits.items()},
    }
    (root / "demo.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    for key, split in splits.items():
        print(
            f"[make-demo-data] {key}: {split.num_images} images, {split.num_annotations} boxes -> "
            f"{split.annotations}",
            flush=True,
        )
    return dataset


def run(cfg: DemoDataConfig) -> int:
    """CLI entry of ``python -m pipeline make-demo-data``; exit code 2 when ``out`` holds another one."""
    try:
        make_demo_data(cfg)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0
