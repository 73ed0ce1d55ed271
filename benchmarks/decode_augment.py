"""Decode + augment throughput per core: JPEG decoders that install here, and our full sample path.

    python benchmarks/decode_augment.py [--images DIR --annotations FILE] [--passes 3] [--scale 1.0]

Defaults to the coco128 copy in ../shared (falls back to tests/data/coco_sample). One thread; rates are
images per second of process CPU time, so other load on the machine does not count. The transform is the
DINO training one (``pipeline.data.transforms.train_transform``); "full path" is what a loader worker does
per sample: JSON record -> target, decode, transform. Prints a table (images/s per core).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.data.stream import decode_sample
from pipeline.data.transforms import make_target, train_transform

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "coco128"


def _pil(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)


def _torchvision(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def _decoders() -> dict[str, Callable[[bytes], torch.Tensor]]:
    decoders = {"PIL (Image.open + convert)": _pil, "torchvision.io.decode_jpeg": _torchvision}
    try:
        import simplejpeg

        decoders["simplejpeg"] = lambda data: torch.from_numpy(simplejpeg.decode_jpeg(data)).permute(2, 0, 1)
    except ImportError:
        pass
    return decoders


def _rate(fn: Callable[[], None], count: int, passes: int) -> float:
    """Images per second of this process's CPU time (one thread: per core, whatever else the machine runs)."""
    fn()  # warm-up
    start = time.process_time()
    for _ in range(passes):
        fn()
    return passes * count / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_images = SHARED / "train2017" if SHARED.is_dir() else ROOT / "tests/data/coco_sample/images"
    default_ann = (
        SHARED / "annotations/instances_train2017.json"
        if SHARED.is_dir()
        else ROOT / "tests/data/coco_sample/instances.json"
    )
    parser.add_argument("--images", type=Path, default=default_images)
    parser.add_argument("--annotations", type=Path, default=default_ann)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    coco = json.loads(args.annotations.read_text())
    by_image: dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    raws = []
    for image in coco["images"]:
        record = {
            **{k: image[k] for k in ("id", "file_name", "width", "height")},
            "annotations": by_image.get(image["id"], []),
        }
        raws.append(
            {"jpg": (args.images / image["file_name"]).read_bytes(), "json": json.dumps(record).encode()}
        )
    transform = train_transform(args.scale)
    torch.manual_seed(0)
    rows = []
    for name, decode in _decoders().items():
        decode_only = _rate(lambda decode=decode: [decode(r["jpg"]) for r in raws], len(raws), args.passes)

        def with_augment(decode=decode) -> None:
            for raw in raws:
                record = json.loads(raw["json"])
                image = decode(raw["jpg"])
                anns = record["annotations"]
                target = make_target(
                    torch.tensor([a["bbox"] for a in anns], dtype=torch.float32),
                    torch.tensor([a["category_id"] for a in anns]),
                    torch.tensor([bool(a["iscrowd"]) for a in anns]),
                    image.shape[1],
                    image.shape[2],
                )
                transform(tv_tensors.Image(image), target)

        rows.append((name, decode_only, _rate(with_augment, len(raws), args.passes)))

    def full_path() -> None:
        for raw in raws:
            image, target, _, _ = decode_sample(raw)
            transform(image, target)

    rows.append(
        (
            "pipeline full path (decode_sample + train_transform)",
            float("nan"),
            _rate(full_path, len(raws), args.passes),
        )
    )
    print(f"{len(raws)} images from {args.images}, one thread, train_transform(scale={args.scale})")
    print(f"{'decoder':<55} {'decode img/s':>13} {'decode+augment img/s':>21}")
    for name, decode_rate, full_rate in rows:
        print(f"{name:<55} {decode_rate:>13.1f} {full_rate:>21.1f}")


if __name__ == "__main__":
    main()
