"""The batch the model consumes, and how transformed samples become one.

Legend: B images per batch; H, W the largest transformed height and width in the batch; n boxes of one
image (crowd boxes included: the training loop drops them before the loss, evaluation may use them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import box_convert

from pipeline.data.transforms import Target


@dataclass
class Batch:
    """What the detector and the training/evaluation loops consume.

    ``images (B, 3, H, W)`` float32 ImageNet-normalised, zero-padded right/bottom to the batch max;
    ``image_sizes (B, 2)`` int64 ``(h, w)`` of each image after its transforms, before padding;
    ``targets``: per image ``boxes (n, 4)`` float32 ``cx, cy, w, h`` normalised by that image's ``(w, h)``,
    ``labels (n,)`` int64 dataset category ids, ``iscrowd (n,)`` bool;
    ``image_ids (B,)`` int64 source image ids; ``orig_sizes (B, 2)`` int64 ``(h, w)`` of the decoded source.
    """

    images: torch.Tensor
    image_sizes: torch.Tensor
    targets: list[dict[str, torch.Tensor]]
    image_ids: torch.Tensor
    orig_sizes: torch.Tensor

    def padding_mask(self) -> torch.Tensor:
        """``(B, H, W)`` bool, True on padding (the DETR convention), derived from ``image_sizes``."""
        _, _, height, width = self.images.shape
        rows = torch.arange(height, device=self.images.device)[None, :, None]
        cols = torch.arange(width, device=self.images.device)[None, None, :]
        h = self.image_sizes[:, 0, None, None].to(self.images.device)
        w = self.image_sizes[:, 1, None, None].to(self.images.device)
        return (rows >= h) | (cols >= w)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch on ``device`` (targets included)."""
        return Batch(
            self.images.to(device, non_blocking=non_blocking),
            self.image_sizes.to(device, non_blocking=non_blocking),
            [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets],
            self.image_ids.to(device, non_blocking=non_blocking),
            self.orig_sizes.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class TransformedSample:
    """One image after its transforms: ``image (3, h, w)`` float32, ``target`` boxes XYXY pixels."""

    image: torch.Tensor
    target: Target
    image_id: int
    orig_size: tuple[int, int]


def collate(samples: Sequence[TransformedSample]) -> Batch:
    """Pad images to the batch's largest size and convert boxes to normalised ``cx, cy, w, h``."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    sizes = torch.tensor([tuple(s.image.shape[-2:]) for s in samples], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    images = samples[0].image.new_zeros((len(samples), 3, height, width))
    targets = []
    for i, sample in enumerate(samples):
        h, w = sample.image.shape[-2:]
        images[i, :, :h, :w] = sample.image
        boxes = box_convert(
            sample.target["boxes"].as_subclass(torch.Tensor).to(torch.float32), "xyxy", "cxcywh"
        )
        boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
        targets.append(
            {
                "boxes": boxes,
                "labels": sample.target["labels"].to(torch.int64),
                "iscrowd": sample.target["iscrowd"].to(torch.bool),
            }
        )
    return Batch(
        images,
        sizes,
        targets,
        torch.tensor([s.image_id for s in samples], dtype=torch.int64),
        torch.tensor([s.orig_size for s in samples], dtype=torch.int64),
    )
