"""Peak memory of one backbone forward + backward, with and without activation checkpointing.

    python benchmarks/backbone_memory.py [--backbone swin_large_patch4_window12_384] [--sizes 512 768]
        [--checkpointing off on] [--device cpu|cuda]

Each configuration runs in a fresh child process: one random square image, random weights, fp32, the
mean of the squared features as the loss. Reported: the growth of peak memory over the built model (on
the CPU the peak RSS, on a GPU the peak allocated memory), which includes the weights' gradients, and the
wall time of the forward + backward.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch

from dino_core.backbone import Backbone


def _measure(
    backbone: str, size: int, checkpointing: bool, device: str, queue: multiprocessing.Queue
) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Backbone(backbone, 3, -1).train().to(device)
    model.checkpointing = checkpointing
    images = torch.randn(1, 3, size, size, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    features, _ = model(images, torch.tensor([[size, size]]))
    sum(f.float().square().mean() for f in features).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(((peak - base) / 2**30, time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="swin_large_patch4_window12_384")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 768])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(f"{args.backbone}, {args.device}, fp32, growth of peak memory over the built model")
    print(f"{'image':>9} {'checkpointing':>14} {'peak GiB':>9} {'seconds':>8}")
    for size in args.sizes:
        for mode in args.checkpointing:
            queue = context.Queue()
            child = context.Process(
                target=_measure, args=(args.backbone, size, mode == "on", args.device, queue)
            )
            child.start()
            growth, seconds = queue.get()
            child.join()
            print(f"{size:>4}x{size:<4} {mode:>14} {growth:>9.2f} {seconds:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
