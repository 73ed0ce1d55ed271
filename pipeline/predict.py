"""``python -m pipeline predict``: detect objects in a folder of images, one image at a time.

``python -m pipeline predict model=<preset> checkpoint=<file.pth | model dir> images=<dir> output=<file.json>
[draw=true]`` writes a COCO results list (``file_name``, ``category_id``, ``bbox`` [x, y, w, h] in the
original image's pixels, ``score``; at most ``num_select`` per image: a label that is not a category of the
checkpoint's class table, such as the gaps in COCO's ids, is dropped and counted) and, with ``draw``, a PNG
per image.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from dino_core import DINOConfig
from dino_core.config import config_from_dict
from pipeline.checkpoint import atomic_write_bytes, load_checkpoint
from pipeline.data.decode import decode_rgb
from pipeline.data.image_check import ImageDecodeError, probe_image
from pipeline.data.transforms import eval_transform, make_target
from pipeline.evaluation.plots import draw_detections

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class PredictConfig:
    """Schema of ``conf/predict.yaml``."""

    checkpoint: str = ""
    """An official DINO ``.pth`` (needs ``model=<preset>``) or one of our model directories."""
    images: str = ""
    """Folder of images (jpg, png, bmp, webp), read in name order."""
    output: str = ""
    """The COCO results JSON to write."""
    model: Any = None
    """The preset of an official checkpoint (``model=<preset>``); our model directories carry their own.
    Typed ``Any`` so that Hydra can leave it empty; checked as a :class:`DINOConfig` below."""
    draw: bool = False
    """Also write ``<output stem>_drawn/<image file name>.png``, the detections above ``draw_threshold``."""
    draw_threshold: float = 0.3
    short_side: int = 800
    max_size: int = 1333
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:i]``."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = config_from_dict(self.model)
        if self.model is not None and not isinstance(self.model, DINOConfig):
            raise ValueError(f"model must be a model preset, got {type(self.model).__name__}")
        for key in ("checkpoint", "images", "output"):
            if not getattr(self, key):
                raise ValueError(f"predict needs {key}=...")
        output, checkpoint = Path(self.output).resolve(), Path(self.checkpoint).resolve()
        if output.suffix != ".json" or output.is_dir():
            raise ValueError(
                f"output={self.output} must name a .json file to write (not a folder or an image)"
            )
        if checkpoint.is_dir() and checkpoint in output.parents:
            raise ValueError(
                f"output={self.output} is inside the checkpoint folder {checkpoint}: write elsewhere"
            )
        if not 0.0 <= self.draw_threshold <= 1.0:
            raise ValueError(f"draw_threshold must be in [0, 1], got {self.draw_threshold}")
        if not 1 <= self.short_side <= self.max_size:
            raise ValueError(f"need 1 <= short_side <= max_size, got {self.short_side} and {self.max_size}")


def list_images(folder: Path) -> list[Path]:
    """The images of ``folder`` in name order, each checked to open as an image.

    Raises:
        ValueError: for a missing folder, an empty one, or any file that is not a readable image (all of
            them named), before any model is loaded.
    """
    if not folder.is_dir():
        raise ValueError(f"images={folder} is not a directory")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"images={folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    bad = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            if image.format == "JPEG":  # verify() reads no JPEG data: a truncated file passed it
                probe_image(path.read_bytes())
        except (UnidentifiedImageError, OSError, SyntaxError, ImageDecodeError) as error:
            bad.append(f"{path.name} ({error})")
    if bad:
        raise ValueError(f"unreadable images in {folder}: {', '.join(bad)}; remove or replace them")
    return paths


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        ValueError: a name torch does not know, or CUDA without a visible GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name} is not a device: use auto, cpu or cuda[:i]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA GPU is visible; use device=cpu")
    return device


@torch.no_grad()
def predict(cfg: PredictConfig) -> tuple[list[dict[str, object]], int]:
    """Run the detector on every image of ``cfg.images``; returns the COCO results records and how many
    detections were dropped for a label outside the checkpoint's class table."""
    paths = list_images(Path(cfg.images))
    device = pick_device(cfg.device)
    model, card = load_checkpoint(Path(cfg.checkpoint), cfg.model, device)
    names = card.class_names()
    transform = eval_transform(cfg.short_side, cfg.max_size)
    draw_dir = Path(cfg.output).with_name(f"{Path(cfg.output).stem}_drawn")
    records: list[dict[str, object]] = []
    dropped = 0
    start = time.monotonic()
    for index, path in enumerate(paths, 1):
        image = decode_rgb(path.read_bytes())
        height, width = image.shape[-2:]
        empty = make_target(
            torch.zeros(0, 4),
            torch.zeros(0, dtype=torch.long),
            torch.zeros(0, dtype=torch.bool),
            height,
            width,
        )
        tensor, _ = transform(tv_tensors.Image(image), empty)
        sizes = torch.tensor([tensor.shape[-2:]])
        outputs = model(tensor[None].to(device), sizes)
        detections = model.postprocess(outputs, torch.tensor([[height, width]]))[0]
        image_records = []
        for score, label, box in zip(
            detections["scores"].tolist(), detections["labels"].tolist(), detections["boxes"].tolist()
        ):
            if label not in names:
                dropped += 1
                continue
            x1, y1, x2, y2 = box
            image_records.append(
                {
                    "file_name": path.name,
                    "category_id": int(label),
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(score, 5),
                }
            )
        records.extend(image_records)
        if cfg.draw:
            draw_detections(
                image, image_records, [], names, cfg.draw_threshold, draw_dir / f"{path.name}.png"
            )
        rate = index / (time.monotonic() - start)
        eta = (len(paths) - index) / rate
        print(f"predict: {index}/{len(paths)} images, {rate:.2f} images/s, ETA {eta:.0f} s", file=sys.stderr)
    return records, dropped


def run(cfg: PredictConfig) -> int:
    """The ``predict`` command; exit code 2 for input it refuses (the message names it)."""
    try:
        records, dropped = predict(cfg)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    atomic_write_bytes(Path(cfg.output), json.dumps(records).encode())
    print(
        f"predict: wrote {len(records)} detections to {cfg.output} ({dropped} dropped: a label outside the "
        "checkpoint's class table)",
        file=sys.stderr,
    )
    return 0
