"""DINO's training and evaluation transforms on torchvision.transforms.v2 and ``tv_tensors``.

Every transform here is called as ``transform(image, target)`` and returns the same structure:

- ``image``: ``tv_tensors.Image`` ``(3, H, W)``; uint8 going in, float32 ImageNet-normalised coming out.
- ``target``: ``{"boxes": tv_tensors.BoundingBoxes (n, 4) XYXY pixels of the current image,
  "labels": (n,) int64 category ids, "iscrowd": (n,) bool}``. Boxes are moved, clipped and dropped by
  torchvision's own box kernels; labels and crowd flags follow the boxes that survive.

Training (the official recipe): random horizontal flip, then with probability 1/2 either a resize of the
short side to one of 480..800 (step 32, long side <= 1333), or resize to 400/500/600, a random crop of
384..600 per side, and the same multi-scale resize again. ``scale`` multiplies every size (1.5 for
fine-tuning: 720..1200, long side <= 2000). Evaluation resizes the short side to one size (800) with the
long side capped (1333); :class:`EvalTransform` tells the resize factor it applies, for TTA inversion.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SHORT_SIDES = tuple(range(480, 801, 32))
TRAIN_MAX_SIZE = 1333
CROP_BRANCH_SHORT_SIDES = (400, 500, 600)
CROP_SIZE_RANGE = (384, 600)

Target = dict[str, Any]


def resized_size(height: int, width: int, short: int, max_size: int | None) -> tuple[int, int]:
    """Output ``(h, w)`` when the short side goes to ``short`` and the long side stays <= ``max_size``.

    The official rule: the short side is lowered first so the long side fits (rounded), then the long
    side follows the aspect ratio (truncated); an image already at that short side is left alone. Unlike
    the official code, the long side is then capped, so rounding can never take it past ``max_size``.
    """
    small, large = min(height, width), max(height, width)
    if max_size is not None and large / small * short > max_size:
        short = round(max_size * small / large)
    if small == short:
        return height, width
    long = int(short * large / small)
    if max_size is not None:
        long = min(long, max_size)
    return (long, short) if width < height else (short, long)


class ResizeShortSide(v2.Transform):
    """Resize so the short side is one of ``sizes`` (drawn uniformly), the long side <= ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = list(sizes)
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        short = self.sizes[int(torch.randint(len(self.sizes), ()))]
        return {"size": list(resized_size(height, width, short, self.max_size))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random window whose height and width are each drawn from ``[low, min(side, high)]``."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__()
        self.low, self.high = low, high

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = query_size(flat_inputs)
        crop_w = int(torch.randint(min(self.low, width), min(width, self.high) + 1, ()))
        crop_h = int(torch.randint(min(self.low, height), min(height, self.high) + 1, ()))
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class NormalizeToFloat(v2.Transform):
    """uint8 image -> float32 ``(x / 255 - mean) / std`` in one contiguous pass (v2.ToDtype + v2.Normalize
    cost 3x more here: the uint8 resize returns a channels-last tensor that their ops broadcast over)."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.shift = torch.tensor(mean, dtype=torch.float32).mul(255.0).view(3, 1, 1)
        self.scale = torch.tensor(std, dtype=torch.float32).mul(255.0).reciprocal().view(3, 1, 1)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = inpt.as_subclass(torch.Tensor).to(torch.float32, memory_format=torch.contiguous_format)
        return tv_tensors.wrap(out.sub_(self.shift).mul_(self.scale), like=inpt)


def _labels_and_crowd(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    target = inputs[1]
    return target["labels"], target["iscrowd"]


def _finish() -> list[v2.Transform]:
    return [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_labels_and_crowd),
        NormalizeToFloat(),
    ]


def train_transform(scale: float = 1.0, branch: int | None = None) -> v2.Transform:
    """The DINO training augmentation; ``scale`` 1.0 for pretraining, 1.5 for fine-tuning.

    ``branch``: None draws the multi-scale resize or the crop branch with probability 1/2 each (the
    recipe); 0 or 1 always takes that one (tests, debugging).
    """
    if scale <= 0:
        raise ValueError(f"train_transform scale must be > 0, got {scale}")
    sides = [round(s * scale) for s in TRAIN_SHORT_SIDES]
    max_size = round(TRAIN_MAX_SIZE * scale)
    crop_sides = [round(s * scale) for s in CROP_BRANCH_SHORT_SIDES]
    low, high = (round(s * scale) for s in CROP_SIZE_RANGE)
    branches = [
        ResizeShortSide(sides, max_size),
        v2.Compose(
            [ResizeShortSide(crop_sides), RandomSizeCrop(low, high), ResizeShortSide(sides, max_size)]
        ),
    ]
    if branch not in (None, 0, 1):
        raise ValueError(f"train_transform branch must be None, 0 or 1, got {branch}")
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(0.5),
            v2.RandomChoice(branches) if branch is None else branches[branch],
            *_finish(),
        ]
    )


class EvalTransform(v2.Compose):
    """Deterministic evaluation transform: short side to ``short``, long side <= ``max_size``, optional
    horizontal flip (for TTA), normalisation. ``resize_factor`` says what it does to a given image."""

    def __init__(self, short: int = 800, max_size: int = 1333, flip: bool = False) -> None:
        if short < 1 or max_size < short:
            raise ValueError(
                f"eval_transform needs 1 <= short <= max_size, got short={short}, max_size={max_size}"
            )
        self.short, self.max_size, self.flip = short, max_size, flip
        steps: list[v2.Transform] = [ResizeShortSide([short], max_size)]
        if flip:
            steps.append(v2.RandomHorizontalFlip(1.0))
        super().__init__([*steps, *_finish()])

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of an image of ``(height, width)`` after this transform."""
        return resized_size(height, width, self.short, self.max_size)

    def resize_factor(self, height: int, width: int) -> tuple[float, float]:
        """``(fy, fx)``: output pixels per input pixel along y and x (boxes scale by these)."""
        out_h, out_w = self.output_size(height, width)
        return out_h / height, out_w / width


def eval_transform(short: int = 800, max_size: int = 1333, flip: bool = False) -> EvalTransform:
    """The DINO evaluation transform at one size (several sizes + flip make the TTA set)."""
    return EvalTransform(short, max_size, flip)


def horizontal_flip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Flip an image and its target's boxes left-right (its own inverse), with torchvision's kernels."""
    return F.horizontal_flip(image), {**target, "boxes": F.horizontal_flip(target["boxes"])}


def make_target(
    boxes_xywh: torch.Tensor, labels: torch.Tensor, iscrowd: torch.Tensor, height: int, width: int
) -> Target:
    """A transform target from COCO ``bbox`` rows ``(n, 4)`` xywh pixels of a ``height x width`` image."""
    xyxy = boxes_xywh.reshape(-1, 4).to(torch.float32).clone()
    xyxy[:, 2:] += xyxy[:, :2]
    boxes = tv_tensors.BoundingBoxes(
        xyxy, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
    )
    return {"boxes": boxes, "labels": labels.to(torch.int64), "iscrowd": iscrowd.to(torch.bool)}
