"""COCO bbox scoring time on a synthetic evaluation set, faster-coco-eval vs pycocotools.

    .venv/bin/python benchmarks/coco_scoring.py [--images 5000] [--dets-per-image 100] [--out FILE.json]

The set imitates COCO val2017: 80 categories with COCO's ids (1..90 with gaps), a Poisson number of boxes
per image (mean 7.3, COCO's), ~1% crowd; detections are noisy copies of the boxes plus false positives,
``--dets-per-image`` per image. Both scorers run through :func:`pipeline.evaluation.coco_scoring.score`
(the stage's path: copies, evaluate, accumulate, summarize) and must agree; the table gives wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.evaluation.coco_scoring import STAT_NAMES, score

COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]


def synthetic_set(
    images: int, dets_per_image: int, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A COCO ground-truth dict and a results list (see the module docstring)."""
    rng = np.random.default_rng(seed)
    gt_images, annotations, detections = [], [], []
    for image_id in range(1, images + 1):
        width, height = int(rng.choice([640, 480, 500, 427])), int(rng.choice([480, 640, 375, 428]))
        gt_images.append({"id": image_id, "width": width, "height": height, "file_name": f"{image_id}.jpg"})
        n = int(rng.poisson(7.3))
        boxes = []
        for _ in range(n):
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = int(rng.choice(COCO_IDS))
            boxes.append((x, y, w, h, category))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": w * h * 0.7,
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
        for k in range(dets_per_image):
            if k < len(boxes) and rng.random() < 0.8:
                x, y, w, h, category = boxes[k]
                box = [
                    x + rng.normal(0, 0.05) * w,
                    y + rng.normal(0, 0.05) * h,
                    w * rng.uniform(0.9, 1.1),
                    h * rng.uniform(0.9, 1.1),
                ]
                s = rng.uniform(0.3, 1.0)
            else:
                w, h = rng.uniform(4, width / 3), rng.uniform(4, height / 3)
                box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
                category, s = int(rng.choice(COCO_IDS)), rng.uniform(0.0, 0.5)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [round(v, 2) for v in box],
                    "score": round(float(s), 4),
                }
            )
    categories = [{"id": i, "name": f"class{i}"} for i in COCO_IDS]
    return {"images": gt_images, "annotations": annotations, "categories": categories}, detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/coco_scoring.json"))
    args = parser.parse_args()
    gt, detections = synthetic_set(args.images, args.dets_per_image)
    rows = []
    results = {}
    for scorer in ("faster", "pycocotools"):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[scorer] = score(gt, detections, scorer)
            times.append(time.perf_counter() - start)
        rows.append({"scorer": scorer, "seconds": min(times), "AP": results[scorer].stats["AP"]})
    worst = max(abs(results["faster"].stats[n] - results["pycocotools"].stats[n]) for n in STAT_NAMES)
    report = {
        "images": args.images,
        "annotations": len(gt["annotations"]),
        "detections": len(detections),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "max_stat_difference": worst,
    }
    print(f"{args.images} images, {len(gt['annotations'])} boxes, {len(detections)} detections")
    print(f"{'scorer':<12} {'seconds':>8} {'AP':>8}")
    for row in rows:
        print(f"{row['scorer']:<12} {row['seconds']:>8.2f} {row['AP']:>8.4f}")
    print(f"largest difference over the 12 stats: {worst:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
