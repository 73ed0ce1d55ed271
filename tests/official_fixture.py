"""Inputs of the official-equivalence fixtures, shared by the test and the (uncommitted) script that ran
the official DINO code on them: deterministic official-layout weights and preprocessed test images.

The committed fixtures (``tests/data/official/*.json``) hold only numbers the official implementation
produced from these inputs, plus the official key layout (names and shapes) the weights are made for.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, read_file

FIXTURE_DIR = Path(__file__).resolve().parent / "data" / "official"
IMAGES = ["000000000030.jpg", "000000000092.jpg"]
"""Two images of tests/data/coco_sample used for the equivalence check."""
SHORT_SIDE = 320
MAX_SIZE = 533
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# Cases: fixture name -> (our model config overrides, official config file, official overrides).
CASES = {
    "r50_4scale": ({"preset": "dino_r50_4scale"}, "DINO_4scale.py", {}),
    "r50_5scale": ({"preset": "dino_r50_5scale"}, "DINO_5scale.py", {}),
    "swint_4scale": (
        {"preset": "dino_r50_4scale", "backbone": "swin_tiny_patch4_window7_224"},
        "DINO_4scale_swin.py",
        {"backbone": "swin_T_224_1k", "use_checkpoint": False},
    ),
}


def _generator(key: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(key.encode()))


def official_layout_weights(key_shapes: list[tuple[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Deterministic random weights for an official-layout state dict, a function of each key and shape.

    Scales keep activations in a sane range so the detections are not degenerate: matrices ~ 1/sqrt(fan_in),
    norms near 1, BatchNorm statistics positive, classifier biases at the 1% prior.
    """
    weights = {}
    shared: dict[str, torch.Tensor] = {}
    for key, shape in key_shapes:
        if key.endswith(("relative_position_index", "attn_mask")):
            continue  # integer index buffers of Swin, rebuilt by every implementation
        # The official model stores one shared head under several names; give all copies one tensor.
        canonical = key
        for head in ("class_embed.", "bbox_embed."):
            if key.startswith((head, f"transformer.decoder.{head}")):
                canonical = head + key.split(head, 1)[1].split(".", 1)[1]
        if canonical in shared:
            weights[key] = shared[canonical]
            continue
        g = _generator(canonical)
        size = torch.Size(shape)
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "running_var":
            value = torch.rand(size, generator=g) + 0.5
        elif leaf == "running_mean":
            value = torch.randn(size, generator=g) * 0.1
        elif len(size) == 1 and leaf == "weight":
            value = 1.0 + torch.randn(size, generator=g) * 0.1
        elif "class_embed" in key and leaf == "bias":
            value = torch.full(size, -math.log(99.0)) + torch.randn(size, generator=g) * 0.5
        elif leaf in ("bias", "in_proj_bias") or "relative_position_bias_table" in key:
            value = torch.randn(size, generator=g) * 0.02
        elif key.endswith("tgt_embed.weight"):
            # One content vector for every query slot: the decoder is then equivariant to the order of
            # the selected proposals, so near-tied encoder scores (whose order fp32 rounding decides)
            # cannot change what is detected, only the order of the queries.
            value = torch.randn(size[1:], generator=g).expand(size).clone()
        elif len(size) >= 2 and not key.endswith(("label_enc.weight", "level_embed")):
            fan_in = size[1:].numel()
            value = torch.randn(size, generator=g) / math.sqrt(fan_in)
        else:
            value = torch.randn(size, generator=g)
        shared[canonical] = value
        weights[key] = value
    return weights


def fixture_images(image_dir: Path) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """The fixture images resized (short side 320, long side <= 533), normalised, padded to one batch.

    Returns:
        images (B, 3, H, W), sizes after resize [(h, w)], original sizes [(h, w)].
    """
    tensors, sizes, originals = [], [], []
    for name in IMAGES:
        image = decode_jpeg(read_file(str(image_dir / name))).float() / 255.0
        h, w = image.shape[-2:]
        scale = min(SHORT_SIDE / min(h, w), MAX_SIZE / max(h, w))
        size = (round(h * scale), round(w * scale))
        resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[
            0
        ]
        mean = torch.tensor(MEAN).view(3, 1, 1)
        std = torch.tensor(STD).view(3, 1, 1)
        tensors.append((resized - mean) / std)
        sizes.append(size)
        originals.append((h, w))
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    batch = torch.zeros(len(tensors), 3, height, width)
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[1], : t.shape[2]] = t
    return batch, sizes, originals
