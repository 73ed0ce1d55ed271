"""Evaluation inference throughput (images/s) of a model preset: forward + post-processing, no data loading.

    .venv/bin/python benchmarks/eval_throughput.py [--preset dino_r50_4scale] [--device cpu|cuda]
        [--height 800 --width 1333] [--batch-size 1] [--iters 3] [--warmup 1] [--amp] [--out FILE.json]

Random-initialised weights (speed does not depend on them, except through which detections post-processing
keeps) on random normalised images of one size, as the evaluation stage batches them (same-size batches,
no padding). Needs torch, timm and dino_core only, so it runs on the GPU machine as it is.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dino_core.builder import build_dino
from dino_core.presets import preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="dino_r50_4scale")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/eval_throughput.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_dino(preset(args.preset)).to(device).eval()
    images = torch.randn(args.batch_size, 3, args.height, args.width, device=device)
    sizes = torch.tensor([[args.height, args.width]] * args.batch_size, device=device)

    def step() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            predictions = model.postprocess(model(images, sizes), sizes)
        predictions[-1]["scores"].cpu()  # wait for the device

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    best = min(times)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine())
    )
    report = {
        "preset": args.preset,
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "image_size": [args.height, args.width],
        "batch_size": args.batch_size,
        "amp": args.amp,
        "seconds_per_batch": times,
        "images_per_s": args.batch_size / best,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    print(
        f"{args.preset} on {report['device']} ({report['threads']} threads), {args.height}x{args.width}, "
        f"batch {args.batch_size}{' bf16' if args.amp else ''}: {report['images_per_s']:.3f} images/s "
        f"(best of {args.iters}: {best:.2f} s per batch)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
