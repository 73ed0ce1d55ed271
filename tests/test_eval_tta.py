"""TTA: inverse box transforms, the one-to-one merge on a hand-computed example, NMS merge, the wrapper."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline.data.transforms import Target, resized_size
from pipeline.evaluation.config import TTAConfig
from pipeline.evaluation.tta import (
    Augmentation,
    DetectorWithTTA,
    apply_to_boxes,
    augmentations_from_config,
    invert_boxes,
    nms_merge,
    one_to_one_merge,
)

ODD_SIZES = [
    ((427, 641), (800, 1201)),
    ((333, 500), (961, 1443)),
    ((97, 131), (61, 83)),
    ((640, 423), (1211, 800)),
]


def _random_boxes(n: int, h: int, w: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2]) + 1
    return torch.cat([xy, xy + wh], dim=1).double()


@pytest.mark.parametrize(("orig", "aug"), ODD_SIZES)
@pytest.mark.parametrize("flip", [False, True])
def test_inverse_transform_is_the_identity_on_boxes(
    orig: tuple[int, int], aug: tuple[int, int], flip: bool
) -> None:
    boxes = _random_boxes(50, *orig, seed=orig[0] + flip)
    forward = apply_to_boxes(boxes, orig, aug, flip)
    torch.testing.assert_close(invert_boxes(forward, orig, aug, flip), boxes, atol=1e-9, rtol=0)
    torch.testing.assert_close(
        apply_to_boxes(invert_boxes(boxes, orig, aug, flip), orig, aug, flip), boxes, atol=1e-9, rtol=0
    )
    # A real transform: boxes stay valid (x1 < x2) and inside the augmented frame.
    assert (forward[:, 2] > forward[:, 0]).all() and (forward[:, 3] > forward[:, 1]).all()
    assert forward[:, 0].min() >= 0 and forward[:, 2].max() <= aug[1]


@pytest.mark.parametrize(("orig", "aug"), ODD_SIZES)
@pytest.mark.parametrize("flip", [False, True])
def test_inverse_undoes_torchvision_resize_and_flip(
    orig: tuple[int, int], aug: tuple[int, int], flip: bool
) -> None:
    """An independent forward transform: torchvision v2 moves tv_tensors boxes with the image."""
    boxes = _random_boxes(20, *orig, seed=7).float()
    image = tv_tensors.Image(torch.zeros(3, *orig, dtype=torch.uint8))
    tv_boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=orig)
    ops = [v2.Resize(aug, antialias=True)] + ([v2.RandomHorizontalFlip(p=1.0)] if flip else [])
    out_image, out_boxes = v2.Compose(ops)(image, tv_boxes)
    assert tuple(out_image.shape[-2:]) == aug
    torch.testing.assert_close(
        invert_boxes(out_boxes.as_subclass(Tensor), orig, aug, flip), boxes, atol=1e-3, rtol=1e-5
    )


def _pred(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float64),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _hand_example() -> list[dict[str, Tensor]]:
    main = _pred([[0, 0, 10, 10], [20, 20, 30, 30]], [0.8, 0.5], [1, 2])
    # IoU with main[0]: Q1 81/119 = 0.68, Q2 100/120 = 0.83 (the best: chosen); Q3 is another class.
    aug1 = _pred([[1, 1, 11, 11], [0, 0, 10, 12], [20, 20, 30, 30]], [0.6, 0.9, 0.9], [1, 1, 3])
    # R1 with main[0]: 80/120 = 0.67 (match); R2 with main[1]: 50/150 = 0.33 (below 0.5: no match).
    aug2 = _pred([[2, 0, 12, 10], [25, 20, 35, 30]], [0.5, 0.4], [1, 2])
    return [main, aug1, aug2]


def test_one_to_one_merge_hand_computed() -> None:
    merged = one_to_one_merge(_hand_example(), weights=[1.0, 1.0, 2.0], main=0, iou_threshold=0.5)
    # main[0]: coefficients matched * weight * score = 0.8 (main), 0.9 (Q2), 2 * 0.5 = 1.0 (R1); sum 2.7.
    expected_0 = [
        (0.8 * 0 + 0.9 * 0 + 1.0 * 2) / 2.7,
        (0.8 * 0 + 0.9 * 0 + 1.0 * 0) / 2.7,
        (0.8 * 10 + 0.9 * 10 + 1.0 * 12) / 2.7,
        (0.8 * 10 + 0.9 * 12 + 1.0 * 10) / 2.7,
    ]
    torch.testing.assert_close(
        merged["boxes"],
        torch.tensor([expected_0, [20.0, 20, 30, 30]], dtype=torch.float64),
        atol=1e-12,
        rtol=0,
    )
    # score "mean": sum of coefficients / sum of all weights (1 + 1 + 2); main[1] matched only itself.
    torch.testing.assert_close(
        merged["scores"], torch.tensor([2.7 / 4, 0.5 / 4], dtype=torch.float64), atol=1e-12, rtol=0
    )
    assert merged["labels"].tolist() == [1, 2]

    main_scores = one_to_one_merge(_hand_example(), [1.0, 1.0, 2.0], 0, 0.5, score_mode="main")
    torch.testing.assert_close(main_scores["scores"], torch.tensor([0.8, 0.5], dtype=torch.float64))
    torch.testing.assert_close(main_scores["boxes"], merged["boxes"])


def test_one_to_one_merge_threshold_and_main_choice() -> None:
    # Above every IoU: nothing matches, the main predictions come back unchanged.
    alone = one_to_one_merge(_hand_example(), [1.0, 1.0, 2.0], 0, iou_threshold=0.9, score_mode="main")
    torch.testing.assert_close(alone["boxes"], _hand_example()[0]["boxes"])
    # Threshold 0.3 lets R2 (IoU 1/3) refine main[1]: (0.5 * [20,20,30,30] + 0.8 * [25,20,35,30]) / 1.3.
    loose = one_to_one_merge(_hand_example(), [1.0, 1.0, 2.0], 0, iou_threshold=0.3)
    expected = torch.tensor([20 + 0.8 * 5 / 1.3, 20, 30 + 0.8 * 5 / 1.3, 30], dtype=torch.float64)
    torch.testing.assert_close(loose["boxes"][1], expected)
    # Another main augmentation keeps its own predictions (3 of aug1).
    other = one_to_one_merge(_hand_example(), [1.0, 1.0, 2.0], 1, iou_threshold=0.5)
    assert len(other["scores"]) == 3 and sorted(other["labels"].tolist()) == [1, 1, 3]
    with pytest.raises(ValueError, match="one weight per augmentation"):
        one_to_one_merge(_hand_example(), [1.0], 0, 0.5)


def test_one_to_one_merge_matches_each_prediction_once_in_score_order() -> None:
    # main[1] is a low-scored duplicate of main[0] (IoU 90/110 = 0.82); main[2] another duplicate with a
    # higher IoU to the flip's box than main[0] has. The flip's one box refines the best-scored only.
    main = _pred([[0, 0, 10, 10], [0, 0, 10, 11], [1, 0, 11, 10]], [0.9, 0.2, 0.3], [1, 1, 1])
    flip = _pred([[1, 0, 11, 10]], [0.8], [1])
    merged = one_to_one_merge([main, flip], [1.0, 1.0], 0, iou_threshold=0.5)
    # main[0]: (0.9 * [0,0,10,10] + 0.8 * [1,0,11,10]) / 1.7, score 1.7 / 2; the duplicates keep their box
    # and get half their score (matched by the main augmentation only).
    expected_first = [0.8 / 1.7, 0.0, 10 + 0.8 / 1.7, 10.0]
    torch.testing.assert_close(merged["scores"], torch.tensor([0.85, 0.15, 0.1], dtype=torch.float64))
    torch.testing.assert_close(
        merged["boxes"],
        torch.tensor([expected_first, [1, 0, 11, 10], [0, 0, 10, 11]], dtype=torch.float64),
        atol=1e-12,
        rtol=0,
    )


def test_one_to_one_merge_with_an_empty_augmentation() -> None:
    preds = [_hand_example()[0], _pred([], [], [])]
    merged = one_to_one_merge(preds, [1.0, 1.0], 0, 0.5, score_mode="main")
    torch.testing.assert_close(merged["boxes"], preds[0]["boxes"])


def test_nms_merge() -> None:
    a = _pred([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [1, 2])
    b = _pred(
        [[1, 0, 11, 10], [50, 50, 60, 60]], [0.7, 0.6], [1, 1]
    )  # b[0]: IoU 90/110 with a[0], suppressed
    merged = nms_merge([a, b], iou_threshold=0.6, max_detections=300)
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8, 0.6])
    assert merged["labels"].tolist() == [1, 2, 1]
    assert merged["boxes"][2].tolist() == [50, 50, 60, 60]
    assert len(nms_merge([a, b], 0.6, max_detections=2)["scores"]) == 2
    # Looser IoU threshold: b[0] survives.
    assert len(nms_merge([a, b], 0.9, 300)["scores"]) == 4


def test_augmentations_from_config() -> None:
    cfg = TTAConfig(
        enabled=True, scales=[600, 800], flip=True, main_scale=800, scale_weights=[0.5, 2.0], flip_weight=0.5
    )
    augs, main = augmentations_from_config(cfg)
    assert [a.name for a in augs] == ["s600", "s600_flip", "s800", "s800_flip"]
    assert [a.weight for a in augs] == [0.5, 0.25, 2.0, 1.0]
    assert augs[main].name == "s800"
    augs, main = augmentations_from_config(TTAConfig(scales=[800], flip=True, main_scale=800, main_flip=True))
    assert augs[main].name == "s800_flip"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"main_scale": 700}, "tta.main_scale"),
        ({"iou_threshold": 0.0}, "tta.iou_threshold"),
        ({"scale_weights": [1.0]}, "tta.scale_weights"),
        ({"merges": ["wbf"]}, "tta.merges"),
        ({"flip": False, "main_flip": True}, "tta.main_flip"),
        ({"scales": [800, 800]}, "tta.scales"),
        ({"score_mode": "max"}, "tta.score_mode"),
    ],
)
def test_tta_config_errors_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        TTAConfig(**kwargs)


class BlobDetector(nn.Module):
    """Detects the one bright rectangle of a synthetic image: its pixel extent in the unpadded image."""

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
            ys, xs = torch.nonzero(image[0, :h, :w] > 0.5, as_tuple=True)
            box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
            results.append(
                {
                    "boxes": box * torch.tensor([tw / w, th / h, tw / w, th / h]),
                    "scores": torch.tensor([0.9]),
                    "labels": torch.tensor([5]),
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


def test_wrapper_maps_every_augmentation_back_to_the_original_image() -> None:
    images, boxes = [], [[20, 30, 61, 50], [5, 40, 90, 77]]
    for (h, w), (x1, y1, x2, y2) in zip([(97, 131), (120, 100)], boxes):
        image = torch.zeros(3, h, w, dtype=torch.uint8)
        image[:, y1:y2, x1:x2] = 255
        images.append(image)
    cfg = TTAConfig(enabled=True, scales=[64, 150, 333], max_size=500, flip=True, main_scale=150)
    out = DetectorWithTTA(BlobDetector(), cfg, nearest_transform_for)(images)
    assert sorted(out.per_augmentation) == ["s150", "s150_flip", "s333", "s333_flip", "s64", "s64_flip"]
    for preds in out.per_augmentation.values():
        for pred, box in zip(preds, boxes):
            # Nearest-neighbour resizing moves an edge by up to 1 / scale source pixels (64 / 100 here).
            torch.testing.assert_close(
                pred["boxes"][0], torch.tensor(box, dtype=torch.float64), atol=1.6, rtol=0
            )
    for how in ("one_to_one", "nms"):
        for pred, box in zip(out.merged[how], boxes):
            assert pred["labels"].tolist() == [5]
            torch.testing.assert_close(
                pred["boxes"][0], torch.tensor(box, dtype=torch.float64), atol=1.6, rtol=0
            )
    # Every augmentation agrees, so the one-to-one score is the full weighted mean (0.9).
    assert out.merged["one_to_one"][0]["scores"].item() == pytest.approx(0.9)
