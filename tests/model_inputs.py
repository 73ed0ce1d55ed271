"""Small real inputs for model tests: COCO sample images resized to a tiny size with their boxes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, read_file

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def coco_batch(
    sample_dir: Path, image_ids: list[int], long_side: int
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images (B, 3, H, W) normalised and zero-padded, sizes (B, 2), targets (non-crowd, cxcywh in [0, 1])."""
    data = json.loads((sample_dir / "instances.json").read_text())
    images = {im["id"]: im for im in data["images"]}
    tensors, sizes, targets = [], [], []
    for image_id in image_ids:
        meta = images[image_id]
        x = decode_jpeg(read_file(str(sample_dir / "images" / meta["file_name"]))).float() / 255
        h, w = x.shape[-2:]
        scale = long_side / max(h, w)
        size = (round(h * scale), round(w * scale))
        x = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        tensors.append((x - MEAN) / STD)
        sizes.append(size)
        anns = [a for a in data["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).view(-1, 4)
        boxes = torch.stack(
            [
                (xywh[:, 0] + xywh[:, 2] / 2) / w,
                (xywh[:, 1] + xywh[:, 3] / 2) / h,
                xywh[:, 2] / w,
                xywh[:, 3] / h,
            ],
            1,
        )
        targets.append(
            {"labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.long), "boxes": boxes}
        )
    batch = torch.zeros(len(tensors), 3, max(s[0] for s in sizes), max(s[1] for s in sizes))
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[1], : t.shape[2]] = t
    return batch, torch.tensor(sizes), targets


def random_targets(counts: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per image ``counts[i]`` random labels in 0..6 and cxcywh boxes inside the image."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "labels": torch.randint(0, 7, (n,), generator=g),
            "boxes": torch.cat(
                [torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.05], 1
            ),
        }
        for n in counts
    ]
