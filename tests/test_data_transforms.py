"""DINO transforms on v2 + tv_tensors: flips, sizes, boxes in bounds, crops, collation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline.data.collate import TransformedSample, collate
from pipeline.data.decode import decode_rgb
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomSizeCrop,
    eval_transform,
    horizontal_flip,
    make_target,
    resized_size,
    train_transform,
)


def _sample(height: int = 240, width: int = 320):
    generator = torch.Generator().manual_seed(0)
    image = tv_tensors.Image(
        torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    )
    boxes = torch.tensor(
        [
            [0.0, 0.0, 40.0, 30.0],  # touches the top-left corner
            [width - 50.0, height - 20.0, 50.0, 20.0],  # touches the bottom-right corner
            [100.0, 80.0, 60.0, 90.0],
            [10.0, 150.0, 200.0, 60.0],
        ]
    )
    target = make_target(boxes, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 0, 1, 0]), height, width)
    return image, target


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_decode_rgb_reads_the_format_from_the_bytes(mode: str) -> None:
    """A PNG decodes whatever its file is called (predict reads folders where a .jpg may be a PNG); a JPEG
    goes through libjpeg-turbo, within a level or two of PIL's decode of the same bytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (13, 17, len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)
    rgb = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert torch.equal(decode_rgb(png.getvalue()), rgb)
    if mode != "RGBA":
        jpeg = io.BytesIO()
        image.save(jpeg, format="JPEG", quality=95)
        decoded = decode_rgb(jpeg.getvalue())
        with Image.open(io.BytesIO(jpeg.getvalue())) as reread:
            reference = torch.from_numpy(np.asarray(reread.convert("RGB")).copy()).permute(2, 0, 1)
        assert decoded.shape == (3, 13, 17) and decoded.dtype == torch.uint8
        assert (decoded.int() - reference.int()).abs().max() <= 2


def test_flip_twice_is_identity_and_flip_mirrors_boxes() -> None:
    image, target = _sample()
    flipped_image, flipped = horizontal_flip(image, target)
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.allclose(flipped["boxes"][0], torch.tensor([280.0, 0.0, 320.0, 30.0]))
    back_image, back = horizontal_flip(flipped_image, flipped)
    assert torch.equal(back_image, image)
    assert torch.equal(back["boxes"], target["boxes"]) and torch.equal(back["labels"], target["labels"])


@pytest.mark.parametrize("scale", [1.0, 1.5])
@pytest.mark.parametrize("branch", [0, 1])
def test_train_branches_sizes_and_boxes_in_bounds(scale: float, branch: int) -> None:
    transform = train_transform(scale, branch=branch)
    short_sides = {round(s * scale) for s in range(480, 801, 32)}
    max_size = round(1333 * scale)
    for seed in range(12):
        torch.manual_seed(seed)
        image, target = _sample(*(((240, 320), (300, 200), (200, 900))[seed % 3]))
        out, out_target = transform(image, target)
        _, h, w = out.shape
        assert out.dtype == torch.float32
        assert min(h, w) in short_sides or max_size - 5 <= max(
            h, w
        )  # capped: rounding may lose a pixel or so
        assert max(h, w) <= max_size
        boxes = out_target["boxes"]
        assert boxes.canvas_size == (h, w)
        assert torch.all(boxes[:, 0] >= 0) and torch.all(boxes[:, 1] >= 0)
        assert torch.all(boxes[:, 2] <= w) and torch.all(boxes[:, 3] <= h)
        assert torch.all(boxes[:, 2] - boxes[:, 0] >= 1) and torch.all(boxes[:, 3] - boxes[:, 1] >= 1)
        assert len(out_target["labels"]) == len(out_target["iscrowd"]) == len(boxes)
        if branch == 0:  # resizing and flipping drop nothing; crowd boxes travel along
            assert sorted(out_target["labels"].tolist()) == [1, 2, 3, 4]
            assert out_target["iscrowd"][out_target["labels"] == 3].item()


def test_crop_keeps_exactly_the_boxes_that_remain() -> None:
    crop = RandomSizeCrop(60, 160)
    finish = v2.Compose(
        [
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(
                min_size=1.0, labels_getter=lambda inputs: (inputs[1]["labels"], inputs[1]["iscrowd"])
            ),
        ]
    )
    image, target = _sample()
    seen_dropped = seen_kept = False
    for seed in range(40):
        torch.manual_seed(seed)
        params = crop.make_params([image])
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        out_image = crop.transform(image, params)
        out_boxes = crop.transform(target["boxes"], params)
        _, out = finish(out_image, {**target, "boxes": out_boxes})
        xyxy = target["boxes"].as_subclass(torch.Tensor)
        inter_w = xyxy[:, 2].clamp(max=left + width) - xyxy[:, 0].clamp(min=left)
        inter_h = xyxy[:, 3].clamp(max=top + height) - xyxy[:, 1].clamp(min=top)
        expected = target["labels"][(inter_w >= 1) & (inter_h >= 1)].tolist()
        assert out["labels"].tolist() == expected
        assert out_image.shape[-2:] == (height, width) and 60 <= width <= 160 and 60 <= height <= 160
        if expected:
            kept = xyxy[(inter_w >= 1) & (inter_h >= 1)]
            shifted = kept - torch.tensor([left, top, left, top])
            clipped = torch.stack(
                [
                    shifted[:, 0].clamp(0, width),
                    shifted[:, 1].clamp(0, height),
                    shifted[:, 2].clamp(0, width),
                    shifted[:, 3].clamp(0, height),
                ],
                dim=1,
            )
            assert torch.allclose(out["boxes"].as_subclass(torch.Tensor), clipped)
        seen_dropped |= len(expected) < 4
        seen_kept |= len(expected) > 0
    assert seen_dropped and seen_kept


def test_eval_transform_size_factor_and_normalisation() -> None:
    image, target = _sample(480, 640)
    transform = eval_transform()
    out, out_target = transform(image, target)
    assert out.shape[-2:] == (800, 1066) == transform.output_size(480, 640)
    fy, fx = transform.resize_factor(480, 640)
    assert fy == pytest.approx(800 / 480) and fx == pytest.approx(1066 / 640)
    assert torch.allclose(
        out_target["boxes"][2], target["boxes"][2] * torch.tensor([fx, fy, fx, fy]), atol=1e-3
    )
    constant = tv_tensors.Image(torch.full((3, 40, 50), 128, dtype=torch.uint8))
    normalised, _ = eval_transform(40, 100)(
        constant, make_target(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), 40, 50)
    )
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(normalised[:, 0, 0], expected, atol=1e-5)
    flipped, flipped_target = eval_transform(flip=True)(image, target)
    assert torch.allclose(flipped, out.flip(-1))
    assert torch.allclose(
        flipped_target["boxes"][0], torch.tensor([1066 - fx * 40, 0.0, 1066.0, fy * 30]), atol=1e-3
    )


@pytest.mark.parametrize(
    ("size", "short", "max_size", "expected"),
    [
        ((480, 640), 800, 1333, (800, 1066)),
        ((640, 480), 800, 1333, (1066, 800)),
        ((500, 2000), 800, 1333, (333, 1332)),
        ((800, 1000), 800, 1333, (800, 1000)),
        ((226, 640), 200, 333, (118, 333)),  # the official rounding would give a long side of 334
    ],
)
def test_resized_size(size: tuple[int, int], short: int, max_size: int, expected: tuple[int, int]) -> None:
    assert resized_size(*size, short, max_size) == expected


def test_collate_pads_and_normalises_boxes() -> None:
    samples = []
    for h, w in ((30, 40), (50, 20)):
        image = torch.ones(3, h, w)
        target = make_target(
            torch.tensor([[0.0, 0.0, w / 2, h / 2]]), torch.tensor([7]), torch.tensor([1]), h, w
        )
        samples.append(TransformedSample(image, target, 5, (h * 2, w * 2)))
    batch = collate(samples)
    assert batch.images.shape == (2, 3, 50, 40)
    assert batch.images[0, :, 30:, :].abs().sum() == 0 and batch.images[1, :, :, 20:].abs().sum() == 0
    assert batch.image_sizes.tolist() == [[30, 40], [50, 20]] and batch.orig_sizes.tolist() == [
        [60, 80],
        [100, 40],
    ]
    for target in batch.targets:
        assert torch.allclose(target["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
        assert target["labels"].tolist() == [7] and target["iscrowd"].tolist() == [True]
    assert batch.padding_mask()[0, 29, 39].item() is False and batch.padding_mask()[0, 30, 0].item() is True
