"""Ahead-of-time build of the fused multi-scale deformable attention ops, and CI's CUDA compile check.

    python -m kernels.build                  # the CPU library, and the CUDA one when a GPU is visible or
                                             # TORCH_CUDA_ARCH_LIST is set
    python -m kernels.build --cuda           # require the CUDA library too
    python -m kernels.build --compile-check  # nvcc-compile the CUDA sources to objects for
                                             # TORCH_CUDA_ARCH_LIST (default 8.0;9.0): no GPU, no link;
                                             # prints a SKIP line without nvcc; exit 1 on a compile error

Where the libraries go and when they rebuild: :mod:`kernels.toolchain`.
"""

from __future__ import annotations

import argparse
import os

import torch

from kernels import toolchain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cuda", action="store_true", help="also build the CUDA library (error if impossible)"
    )
    parser.add_argument(
        "--compile-check",
        action="store_true",
        help="only nvcc-compile the CUDA sources to objects for TORCH_CUDA_ARCH_LIST "
        f"(default {toolchain.COMPILE_CHECK_ARCHS})",
    )
    args = parser.parse_args(argv)
    if args.compile_check:
        return toolchain.compile_check(
            os.environ.get("TORCH_CUDA_ARCH_LIST") or toolchain.COMPILE_CHECK_ARCHS
        )
    print(f"kernels.build: cpu -> {toolchain.library('cpu', build=True)}")
    if args.cuda or torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print(f"kernels.build: cuda -> {toolchain.library('cuda', build=True)}")
    else:
        print("kernels.build: no GPU and no TORCH_CUDA_ARCH_LIST: the CUDA library is not built")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
