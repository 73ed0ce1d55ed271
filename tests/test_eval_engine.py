"""The evaluation engine with a synthetic detector: perfect detections score 1 in every mode, ATD, batching,
and the same detections and metrics for any batch size (ranks: tests/test_eval_stage.py, real model).

The detector finds coloured rectangles (channel c -> category 1, 44 or 90: ids with COCO's gaps) in the
image it is given; images have short side 100 and the resizes are integer factors with nearest-neighbour
sampling, so every augmentation maps the boxes back exactly.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict

import pytest
import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from pipeline.data.transforms import Target, resized_size
from pipeline.evaluation.config import EvalConfig, TTAConfig
from pipeline.evaluation.engine import EvalRun, evaluate, same_size_batches
from pipeline.evaluation.samples import EvalSample
from pipeline.evaluation.tta import Augmentation

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 44, "name": "bottle"}, {"id": 90, "name": "toothbrush"}]
LABEL_OF_CHANNEL = [1, 44, 90]
SIZES = [
    (100, 150),
    (100, 130),
    (120, 100),
    (100, 150),
    (100, 150),
    (100, 100),
    (100, 130),
    (100, 150),
    (140, 100),
]


class ColourBlobDetector(nn.Module):
    """Per channel, the bounding box of the pixels above 0.5 in the unpadded image (one box per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images: Tensor, image_sizes: Tensor) -> dict[str, Tensor]:
        return {"images": images, "sizes": image_sizes}

    def postprocess(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        results = []
        for image, (h, w), (th, tw) in zip(
            outputs["images"], outputs["sizes"].tolist(), target_sizes.tolist()
        ):
            boxes, scores, labels = [], [], []
            for channel, label in enumerate(LABEL_OF_CHANNEL):
                ys, xs = torch.nonzero(image[channel, :h, :w] > 0.5, as_tuple=True)
                if len(xs):
                    boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                    scores.append(0.9 - 0.1 * channel)
                    labels.append(label)
            box = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
            results.append(
                {
                    "boxes": box * torch.tensor([tw / w, th / h, tw / w, th / h]),
                    "scores": torch.tensor(scores),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                }
            )
        return results


def nearest_transform_for(aug: Augmentation) -> Callable[[Tensor, Target], tuple[Tensor, Target]]:
    """The eval transform's geometry with nearest-neighbour sampling (integer scale factors stay exact)."""

    def transform(image: Tensor, target: Target) -> tuple[Tensor, Target]:
        size = list(resized_size(*image.shape[-2:], aug.short_side, aug.max_size))
        ops = [v2.Resize(size, interpolation=v2.InterpolationMode.NEAREST)]
        ops += [v2.RandomHorizontalFlip(1.0)] if aug.flip else []
        return v2.Compose([*ops, v2.ToDtype(torch.float32, scale=True)])(image, target)

    return transform


def make_samples(seed: int = 0) -> list[EvalSample]:
    rng = random.Random(seed)
    samples = []
    for i, (h, w) in enumerate(SIZES):
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        annotations = []
        for channel in rng.sample(range(3), rng.randint(1, 3)):
            bw, bh = rng.randint(20, w - 10), rng.randint(20, h - 10)
            x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
            image[channel, y : y + bh, x : x + bw] = 255
            annotations.append(
                {
                    "category_id": LABEL_OF_CHANNEL[channel],
                    "bbox": [float(x), float(y), float(bw), float(bh)],
                    "area": float(bw * bh),
                    "iscrowd": 0,
                }
            )
        if i == 2:  # a crowd region nobody detects: ignored by COCO, not a miss
            annotations.append({"category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0], "area": 25.0, "iscrowd": 1})
        record = {
            "id": 1000 - 7 * i,
            "file_name": f"{i}.png",
            "width": w,
            "height": h,
            "annotations": annotations,
        }
        samples.append(EvalSample(image=image, record=record))
    return samples


EVAL = {"short_side": 200, "max_size": 500, "draw_images": 2, "progress_every_s": 0.01}
TTA = {"enabled": True, "scales": [100, 200, 300], "max_size": 500, "flip": True, "main_scale": 200}


def run(
    samples: list[EvalSample], batch_size: int, distances: bool = False, atd_k: int = 100
) -> EvalRun | None:
    def anchor_distances(outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        return [t["boxes"][:, 2] for t in targets]  # a stand-in: each target's normalised width

    return evaluate(
        ColourBlobDetector(),
        samples,
        CATEGORIES,
        EvalConfig(batch_size=batch_size, atd_k=atd_k, **EVAL),
        TTAConfig(**TTA),
        nearest_transform_for,
        anchor_distances if distances else None,
    )


def comparable(result: EvalRun) -> str:
    """Everything a run reports except timing, as canonical JSON."""
    return json.dumps(
        {
            "metrics": {mode: asdict(m) for mode, m in result.metrics.items()},
            "detections": result.detections,
            "atd": asdict(result.atd),
            "images": result.num_images,
            "dropped": result.dropped_labels,
            "drawn": [image_id for image_id, _ in result.drawn],
        },
        sort_keys=True,
    )


def test_perfect_detector_scores_one_in_every_mode() -> None:
    result = run(make_samples(), batch_size=3)
    assert result is not None
    assert sorted(result.metrics) == ["plain", "tta_nms", "tta_one_to_one"]
    for mode, metrics in result.metrics.items():
        for name in ("AP", "AP50", "AP75", "AR100"):
            assert metrics.stats[name] == pytest.approx(1.0), (mode, name)
        assert set(metrics.per_class_ap) == {1, 44, 90}
    gt_boxes = sorted(
        (r["id"], a["category_id"], a["bbox"])
        for s in make_samples()
        for r in [s.record]
        for a in r["annotations"]
        if not a["iscrowd"]
    )
    for mode in result.detections:
        assert (
            sorted((d["image_id"], d["category_id"], d["bbox"]) for d in result.detections[mode]) == gt_boxes
        )
    assert result.num_images == len(SIZES)
    assert result.detections["plain"] == sorted(
        result.detections["plain"], key=lambda d: (d["image_id"], -d["score"])
    )
    assert [image_id for image_id, _ in result.drawn] == [944, 951]  # the two smallest ids
    assert result.atd.value is None and "anchors" in (result.atd.reason or "")


def test_atd_is_the_mean_of_the_k_largest_distances() -> None:
    result = run(make_samples(), batch_size=2, distances=True)
    widths = sorted(
        (
            a["bbox"][2] / s.record["width"]
            for s in make_samples()
            for a in s.record["annotations"]
            if not a["iscrowd"]
        ),
        reverse=True,
    )
    assert result is not None and result.atd.num_distances == len(widths) < 100
    assert (
        result.atd.k == 100 and result.atd.value is None and "needs at least 100" in (result.atd.reason or "")
    )
    result = run(make_samples(), batch_size=3, distances=True, atd_k=5)
    assert result is not None and result.atd.value == pytest.approx(sum(widths[:5]) / 5, abs=1e-6)  # rounded


def test_batches_hold_one_image_size_and_every_image_once() -> None:
    samples = make_samples()
    batches = list(same_size_batches(samples, batch_size=2, max_buffered=3))
    assert all(len({tuple(s.image.shape) for s in b}) == 1 and len(b) <= 2 for b in batches)
    assert sorted(s.image_id for b in batches for s in b) == sorted(s.image_id for s in samples)


def test_batch_size_does_not_change_anything() -> None:
    reference = comparable(run(make_samples(), batch_size=1))
    for batch_size in (2, 4):
        assert comparable(run(make_samples(), batch_size=batch_size)) == reference


class UnknownClassDetector(ColourBlobDetector):
    """Finds the blobs but names them with ids outside the category table (12: one of COCO's gaps)."""

    def postprocess(self, outputs: dict[str, Tensor], target_sizes: Tensor) -> list[dict[str, Tensor]]:
        return [
            {**p, "labels": torch.full_like(p["labels"], 12)}
            for p in super().postprocess(outputs, target_sizes)
        ]


def test_no_valid_prediction_scores_zero_and_counts_the_dropped() -> None:
    result = evaluate(
        UnknownClassDetector(),
        make_samples(),
        CATEGORIES,
        EvalConfig(**EVAL),
        TTAConfig(**TTA),
        nearest_transform_for,
    )
    assert result is not None
    boxes = sum(1 for s in make_samples() for a in s.record["annotations"] if not a["iscrowd"])
    for mode, metrics in result.metrics.items():
        assert result.detections[mode] == [] and metrics.stats["AP"] == 0.0 and metrics.stats["AR100"] == 0.0
    # One prediction per blob; the NMS merge may also suppress overlapping blobs, now of one class.
    assert result.dropped_labels["plain"] == result.dropped_labels["tta_one_to_one"] == boxes
    assert 0 < result.dropped_labels["tta_nms"] <= boxes
